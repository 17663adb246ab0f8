"""The paper's tables from configurations, as rows the writers render: which configurations differ
in one factor alone, the baseline each row is compared with, and that comparison (``pipeline.stats``).
Pure data in, data out: no MLflow, no plotting."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.stats import Comparison, Estimate, compare, estimate
from sasa.models import FORMS, model_family
from sasa.paper import DETECTION_RATIOS, STEM_ABLATION, TABLE1, TABLE3, TABLE4, TABLE5

DEPTH_NAMES = {"resnet26": "ResNet-26", "resnet38": "ResNet-38", "resnet50": "ResNet-50"}
# what only attention uses: irrelevant to a network with a conv stem and no attention group
ATTENTION_ONLY = ("kernel_size", "heads", "pos_enc", "mixer", "mixer_args")
TOP1 = "top-1 % (mean ± 95% CI)"
MAP = "mAP % (mean ± 95% CI)"


@dataclass
class Configuration:
    """One configuration: an architecture trained by one recipe, over one or more seeds."""

    arch: dict
    params: int
    mflops: float
    task: str = "classification"  # its score: top-1, or a detector's mAP (pipeline.tasks)
    runs: dict[int, dict] = field(default_factory=dict)  # seed -> its latest run
    names: set[str] = field(default_factory=set)  # the variants and sweep points that trained it
    trials: set[tuple[str, str]] = field(default_factory=set)  # (sweep, swept values) of its trials
    # the train values its recipe has of those the sweep changes (sweep.train, swept train keys): {"epochs": 6}
    train: dict = field(default_factory=dict)

    @property
    def is_resnet(self) -> bool:
        return is_resnet(self.arch)

    @property
    def is_detector(self) -> bool:
        return is_detector(self.arch)

    @property
    def attends(self) -> bool:
        if not (self.is_resnet or self.is_detector):
            return True
        backbone = bool(self.arch["attention_groups"]) or self.arch["stem"] != "conv"
        return backbone or self.arch.get("head_mixer", "conv") != "conv"

    @property
    def kind(self) -> str:
        """What the plot marks it by: the SASA form, the attention mixer, the model family, or a
        detector's backbone and heads."""
        if self.is_detector:
            return f"{backbone_name(self.arch)} + {self.arch['head_mixer']} FPN/heads"
        if not self.is_resnet:
            return family_of(self.arch)
        if self.arch["attention_groups"] and self.arch["mixer"] != "sasa":
            return self.arch["mixer"]
        return paper_form(self.arch) or "other"

    def scores(self) -> dict[int, float]:
        """Each seed's score: top-1 %, or a detector's mAP %."""
        return {seed: r["score"] for seed, r in self.runs.items()}

    def estimate(self) -> Estimate:
        return estimate(list(self.scores().values()))

    def label(self) -> str:
        return ", ".join(sorted(self.names))


def is_detector(arch: dict) -> bool:
    """A detector over a ResNet (its resolved architecture records what fills its FPN and heads)."""
    return "head_mixer" in arch


def is_resnet(arch: dict) -> bool:
    """The paper's classification tables compare ResNets; other families (transformers) are in the
    plot and lists, detectors in Table 2."""
    return "attention_groups" in arch and not is_detector(arch)


def backbone_name(arch: dict) -> str:
    """A detector's backbone as Table 2 names it: its SASA form, or its stem and attention groups."""
    form = paper_form(_as_resnet(arch))
    if form:
        return form
    return f"{arch['stem']} stem, {arch['mixer']} in groups {show_groups(arch['attention_groups'])}"


def _as_resnet(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if k != "head_mixer"}


def family_of(arch: dict) -> str:
    """The model registry's family (ViT, MaxViT, ..., CvT); "ST-MoE" where the MLPs are sparse experts."""
    if arch.get("moe") is not None:
        return "ST-MoE"
    return model_family(arch["model"])


def paper_form(arch: dict) -> str | None:
    """The Table 1 form whose stem and attention groups (with SASA) this architecture has, if any."""
    if not is_resnet(arch):
        return None
    for name, form in FORMS.items():
        if (arch["stem"], tuple(arch["attention_groups"])) != (form["stem"], tuple(form["attention_groups"])):
            continue
        if not form["attention_groups"] or arch["mixer"] == "sasa":
            return name
    return None


# ---------------------------------------------------------------------------------------------
# What the tables are made of


@dataclass(frozen=True)
class Row:
    """One configuration in a table: its leading cells, and its comparison with the block's baseline
    (None for the baseline itself, or where there is none to compare with: ``note`` says which)."""

    lead: tuple[str, ...]
    config: Configuration
    comparison: Comparison | None
    note: str
    paper: str | None  # the paper's numbers for this row; None: the table has no paper column


@dataclass(frozen=True)
class Block:
    """Rows that differ in the table's factor alone; ``where`` is what sets them apart from the
    table's other blocks (empty for a table of one block)."""

    where: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Section:
    title: str
    intro: str  # the baseline, and what the paper's numbers are
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Tables:
    """What ``results.md`` shows of the configurations: each table the runs cover (the paper's, then
    the families beyond the ResNets), and the paper's tables no runs cover."""

    sections: tuple[Section, ...]
    without_runs: tuple[Table, ...]

    def section(self, title: str) -> Section | None:
        return next((s for s in self.sections if s.title == title), None)

    def comparisons(self) -> list[Comparison]:
        """Every test against a baseline, one per row that has one."""
        return [r.comparison for s in self.sections for b in s.blocks for r in b.rows if r.comparison is not None]


def _row(lead: tuple[str, ...], c: Configuration, base: Configuration | None, paper: str | None, no_base: str) -> Row:
    if base is None:
        return Row(lead, c, None, no_base, paper)
    if c is base:
        return Row(lead, c, None, "baseline", paper)
    return Row(lead, c, compare(c.scores(), base.scores()), "", paper)


# ---------------------------------------------------------------------------------------------
# The paper's tables: configurations that differ in one factor alone


def factor_block(table: Table, block: list[Configuration], where: str) -> Block:
    """A one-factor table: each value of the factor against the block's baseline."""
    (key,) = table.factor
    if callable(table.baseline):
        base = table.baseline(block)
    else:
        base = next((c for c in block if c.arch[key] == table.baseline), block[0])
    rows = [
        _row((table.show(c.arch[key]),), c, base, table.paper_cell(c.arch[key]), "baseline")
        for c in sorted(block, key=lambda c: table.order(c.arch[key]))
    ]
    return Block(where, (key, "MFLOPs", "params (M)", TOP1, "vs baseline", "paper"), tuple(rows))


def depth_form_block(table: Table, block: list[Configuration], where: str) -> Block:
    """Table 1: each form of each depth against that depth's baseline form (``table.baseline``)."""
    depths = [d for d in DEPTH_NAMES if any(c.arch["model"] == d for c in block)]
    rows = []
    for form in FORMS:
        for d in depths:
            base = next((c for c in block if paper_form(c.arch) == table.baseline and c.arch["model"] == d), None)
            for c in block:
                if paper_form(c.arch) == form and c.arch["model"] == d:
                    lead = (form.replace("_", " "), DEPTH_NAMES[d])
                    no_base = f"no {table.baseline} run of this depth"
                    rows.append(_row(lead, c, base, table.paper_cell((d, form)), no_base))
    columns = (
        "form",
        "depth",
        "MFLOPs",
        "params (M)",
        TOP1,
        f"vs {table.baseline}",
        "paper: GFLOPs / M params / top-1",
    )
    return Block(where, columns, tuple(rows))


def detection_block(table: Table, block: list[Configuration], where: str) -> Block:
    """Table 2: each backbone with conv, then attention, FPN and heads, against the all-conv detector
    of the same settings; FLOPs and parameters also as its ratios to that detector's, the all-attention
    row beside the abstract's."""
    base = next((c for c in block if not c.attends), None)
    forms = list(FORMS)

    def order(c: Configuration):
        form = paper_form(_as_resnet(c.arch))
        return c.arch["head_mixer"] != "conv", forms.index(form) if form in forms else len(forms), c.mflops

    rows = []
    for c in sorted(block, key=order):
        ratios = "-" if base is None else f"{c.mflops / base.mflops:.2f}x / {c.params / base.params:.2f}x"
        if paper_form(_as_resnet(c.arch)) == "full_attention" and c.arch["head_mixer"] != "conv":
            ratios += " (abstract: {flops:.2f}x / {params:.2f}x)".format(**DETECTION_RATIOS)
        lead = (backbone_name(c.arch).replace("_", " "), c.arch["head_mixer"])
        rows.append(_row(lead, c, base, ratios, "no all-conv detector of these settings"))
    columns = ("backbone", "FPN + heads", "MFLOPs", "params (M)", MAP, "vs all-conv", "FLOPs / params vs all-conv")
    return Block(where, columns, tuple(rows))


def best_mean(block: list[Configuration]) -> Configuration:
    return max(block, key=lambda c: c.estimate().mean)


def paper_numbers(numbers: dict, fmt: str, key: Callable = lambda value: value) -> Callable[[object], str]:
    """A paper column: ``numbers`` (from ``sasa.paper``) of a row's factor value, as ``fmt``; "-"
    where the paper gives none."""

    def cell(value) -> str:
        found = numbers.get(key(value))
        if not found:
            return "-"
        return fmt.format(*found) if isinstance(found, tuple) else fmt.format(found)

    return cell


def show_groups(groups) -> str:
    return ", ".join(map(str, groups)) if groups else "none (all conv)"


@dataclass(frozen=True)
class Table:
    """One of the paper's ablations, as a set of configurations that differ in ``factor`` alone."""

    title: str
    factor: tuple[str, ...]  # the architecture keys the table varies
    wanted: Callable[[Configuration], bool]  # which configurations belong to it
    # each block's baseline: the factor value of its row (Table 1: its form), or a callable choosing the configuration
    baseline: object
    baseline_text: str  # the same, in the report's words
    how: str  # the params that produce it
    paper: str  # what the paper's numbers are
    paper_cell: Callable[[object], str]  # the paper's numbers for a factor value (Table 1: for (depth, form))
    show: Callable[[object], str] = str  # a factor value as its row shows it
    order: Callable[[object], object] = lambda value: value  # rows sort by this of their factor value
    needs: Callable[[Configuration], bool] = lambda c: True  # a block shows only if one of its configurations has this
    layout: Callable[[Table, list[Configuration], str], Block] = factor_block
    detectors: bool = False  # a table of detectors (Table 2); the others are of classifiers

    def members(self, configs: list[Configuration]) -> list[Configuration]:
        return [c for c in configs if (c.is_detector if self.detectors else c.is_resnet) and self.wanted(c)]

    def block(self, configs: list[Configuration], where: str) -> Block:
        return self.layout(self, configs, where)


TABLES = [
    Table(
        title="Table 1: depth and form",
        factor=("model", "stem", "attention_groups"),
        wanted=lambda c: paper_form(c.arch) is not None,
        baseline="conv",
        baseline_text="the conv form of the same depth",
        how="variants of `form: conv | conv_stem_attention | full_attention` (and `model: resnet26 | resnet38 | "
        "resnet50`), e.g. the default params.yaml or configs/imagenet.yaml",
        paper="ImageNet, 224 px, full-width models",
        paper_cell=paper_numbers(TABLE1, "{:.1f} / {:.1f} / {:.1f}"),
        layout=depth_form_block,
    ),
    Table(
        title="Table 2: detection (RetinaNet, FPN + heads x backbone)",
        factor=("stem", "attention_groups", "head_mixer"),
        wanted=lambda c: True,
        baseline="conv",
        baseline_text="the all-conv RetinaNet (conv backbone, conv FPN and heads) of the same settings",
        how="variants of `model: retinanet_resnet26 | 38 | 50` with `form` x `head_mixer: conv | sasa` on "
        "`data.source: digit_canvases | coco` (configs/table2.yaml, configs/coco.yaml)",
        paper="COCO, RetinaNet with a ResNet-50 FPN; the abstract gives the all-attention detector's ratios to the "
        "conv one, 0.61x FLOPs and 0.66x parameters, at equal mAP",
        paper_cell=lambda value: "-",
        layout=detection_block,
        detectors=True,
    ),
    Table(
        title="Table 3: which groups hold attention",
        factor=("attention_groups",),
        wanted=lambda c: c.arch["stem"] == "conv" and (not c.arch["attention_groups"] or c.arch["mixer"] == "sasa"),
        baseline=(),
        baseline_text="all-conv groups (the conv form)",
        how="`sweep.space: {attention_groups: [[4], [3, 4], [2, 3, 4], ...]}` (configs/table3.yaml)",
        paper="ResNet-50, conv stem, top-1 on a held-out 4% of ImageNet's training set",
        paper_cell=paper_numbers(TABLE3, "{:.1f} G / {:.1f} M / {:.1f}", key=tuple),
        show=show_groups,
        order=lambda groups: (len(groups), groups),
        # all conv against attention everywhere is Table 1's comparison: this table needs a mixed row
        needs=lambda c: tuple(c.arch["attention_groups"]) not in ((), (1, 2, 3, 4)),
    ),
    Table(
        title="Table 4: spatial extent k",
        factor=("kernel_size",),
        wanted=lambda c: c.attends and c.arch["mixer"] == "sasa",
        baseline=best_mean,
        baseline_text="the best k",
        how="`sweep.space: {kernel_size: [3, 5, 7, 9, 11]}` (configs/imagenet.yaml, configs/cpu_study.yaml)",
        paper="ResNet-50, conv stem, attention in every group, ImageNet",
        paper_cell=paper_numbers(TABLE4, "{:.1f} G / {:.1f} M / {:.1f}"),
    ),
    Table(
        title="Table 5: positional encoding",
        factor=("pos_enc",),
        wanted=lambda c: c.attends and c.arch["mixer"] == "sasa",
        baseline="relative",
        baseline_text="relative (the paper's)",
        how="`sweep.space: {pos_enc: [none, absolute, relative]}` (configs/table5.yaml)",
        paper="ResNet-50, held-out 4% of ImageNet's training set",
        paper_cell=paper_numbers(TABLE5, "{:.1f} G / {:.1f}"),
    ),
    Table(
        title="Stem ablation",
        factor=("stem",),
        wanted=lambda c: bool(c.arch["attention_groups"]) and c.arch["mixer"] == "sasa",
        baseline="attention",
        baseline_text="the spatially-aware attention stem (the paper's)",
        how="`sweep.space: {stem: [conv, attention_plain, attention_conv_values, attention]}` "
        "(configs/stem_ablation.yaml)",
        paper="ResNet-50, attention in every group, ImageNet",
        paper_cell=paper_numbers(STEM_ABLATION, "{:.1f}"),
    ),
]


def _context(c: Configuration, factor) -> tuple:
    """What a configuration is besides the table's factor; a network without attention has no
    attention settings, so its context leaves them out (it joins every attention context)."""
    drop = set(factor) | (set(ATTENTION_ONLY) if not c.attends else set())
    arch = ((k, json.dumps(v)) for k, v in c.arch.items() if k not in drop)
    return tuple(sorted([*arch, *((f"train.{k}", json.dumps(v)) for k, v in c.train.items() if k not in drop)]))


def _factor_value(c: Configuration, factor) -> tuple:
    return tuple(json.dumps(c.arch[k]) for k in factor)


def blocks(table: Table, configs: list[Configuration]) -> list[list[Configuration]]:
    """Groups of configurations that differ in the table's factor alone, each with two or more values."""
    members = table.members(configs)
    groups = defaultdict(list)
    for c in members:
        if c.attends:
            groups[_context(c, table.factor)].append(c)
    for c in members:
        if not c.attends:
            reduced = dict(_context(c, table.factor))
            homes = [
                ctx
                for ctx in groups
                if any(m.attends for m in groups[ctx]) and all(dict(ctx).get(k) == v for k, v in reduced.items())
            ]
            for ctx in homes or [_context(c, table.factor)]:
                groups[ctx].append(c)
    return [
        g
        for g in groups.values()
        if len({_factor_value(c, table.factor) for c in g}) > 1 and any(table.needs(c) for c in g)
    ]


def _differing(block: list[Configuration], found: list[list[Configuration]], factor) -> str:
    """What sets this block apart from the table's other blocks (empty for a table of one block)."""

    def context(b):
        return dict(_context(next((c for c in b if c.attends), b[0]), factor))

    contexts, mine = [context(b) for b in found], context(block)
    keys = [k for k in mine if any(ctx.get(k) != mine[k] for ctx in contexts)]
    return ", ".join(f"{k} = {json.loads(mine[k])}" for k in keys)


def families_section(configs: list[Configuration]) -> Section | None:
    """Every configuration beyond the ResNets (ViT, CvT, ...) against the conv ResNet of the same
    recipe (the one with the most seeds), paired by seed."""
    others = [c for c in configs if not (c.is_resnet or c.is_detector)]
    if not others:
        return None
    convs = [c for c in configs if paper_form(c.arch) == "conv"]
    base = max(convs, key=lambda c: (len(c.runs), c.mflops)) if convs else None
    if base:
        where = f"the conv {DEPTH_NAMES.get(base.arch['model'], base.arch['model'])} ({base.label()})"
    else:
        where = "none: no conv ResNet run"
    rows = [_row((c.kind, c.label()), c, base, None, "-") for c in sorted(others, key=lambda c: c.mflops)]
    columns = ("family", "configuration", "MFLOPs", "params (M)", TOP1, "vs conv")
    return Section(
        "Model families beyond the ResNets",
        f"Baseline: {where}, same recipe and data.",
        (Block("", columns, tuple(rows)),),
    )


BUDGET = "Training budget: the gap to the convolution by training length"


def budget_section(configs: list[Configuration]) -> Section | None:
    """Each attention form's gap to the conv form of the same depth and recipe at every training length,
    paired by seed: whether attention closes in on the convolution as training grows. Shown when the
    runs cover two or more ``train.epochs`` (configs/budget.yaml)."""
    forms = [c for c in configs if paper_form(c.arch) and "epochs" in c.train]
    if len({c.train["epochs"] for c in forms}) < 2:
        return None

    def setting(c: Configuration):  # what a form's configuration shares with its conv baseline
        others = {k: v for k, v in c.train.items() if k != "epochs"}
        return c.arch["model"], json.dumps(others, sort_keys=True), c.train["epochs"]

    rows = []
    order = list(FORMS)
    for c in sorted(forms, key=lambda c: (setting(c), order.index(paper_form(c.arch)))):
        convs = [b for b in forms if paper_form(b.arch) == "conv" and setting(b) == setting(c)]
        base = max(convs, key=lambda b: len(b.runs)) if convs else None
        lead = (
            str(c.train["epochs"]),
            DEPTH_NAMES.get(c.arch["model"], c.arch["model"]),
            paper_form(c.arch).replace("_", " "),
        )
        rows.append(_row(lead, c, base, None, "no conv run of this length"))
    columns = ("epochs", "depth", "form", "MFLOPs", "params (M)", TOP1, "vs conv of the same length")
    return Section(
        BUDGET,
        "Each form against the conv form of the same depth trained for as many epochs, paired by seed "
        "(configs/budget.yaml). A gap that shrinks with epochs is the budget's; one that stays is the method's at "
        "this scale.\n\n![gap vs epochs](budget_gap_vs_epochs.png)",
        (Block("", columns, tuple(rows)),),
    )


def paper_tables(configs: list[Configuration]) -> Tables:
    """The tables the configurations cover; of the others, Table 2 (what a classification report
    points to) and those of the task the configurations are of (a detectors-only report lists no
    classification table)."""
    sections, without_runs = [], []
    kinds = {c.is_detector for c in configs}
    for table in TABLES:
        found = blocks(table, configs)
        if not found:
            if table.detectors or table.detectors in kinds:
                without_runs.append(table)
            continue
        intro = f"Baseline of each comparison: {table.baseline_text}. Paper: {table.paper}."
        sections.append(
            Section(table.title, intro, tuple(table.block(b, _differing(b, found, table.factor)) for b in found))
        )
    extra = [section for section in (families_section(configs), budget_section(configs)) if section]
    return Tables((*sections, *extra), tuple(without_runs))
