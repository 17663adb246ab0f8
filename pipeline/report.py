"""Stage ``report``: read every tracked run back from MLflow and write the paper's results, with
their uncertainty, to ``reports/``.

Runs are pooled by what they trained, not by what they were called: variants and sweep trials
with the same resolved architecture (``sasa.arch``) and recipe (``sasa.recipe``, the data and
train sections without the seed) are one *configuration*, its runs told apart by seed. Only runs
of the current recipe count (a stale run of another recipe never shows up as a result); sweep
trials count when they ran every epoch (an ASHA-stopped trial trained less). Top-1 is the last
epoch's everywhere, as in the paper.

- ``results.md``: each of the paper's ablations that the runs cover, beside the paper's numbers:
  Table 1 (depth x form), Table 3 (attention groups), Table 4 (spatial extent k), Table 5
  (positional encoding) and the stem ablation. A table is a set of configurations that differ in
  its factor alone; every cell is the mean with its 95% interval and n, and every row says whether
  its difference from the table's baseline is resolved or within noise (``pipeline.stats``). A
  table no runs cover is one line saying which params produce it. Then every variant and every
  sweep trial.
- ``accuracy_vs_flops.png`` / ``accuracy_vs_params.png``: every configuration, mean and 95%
  interval as error bars, one marker per form or attention mixer, the Pareto front of the means;
- ``sweep_accuracy_vs_flops.png``: the sweep's configurations, coloured by k, marked by stem;
- ``results.csv``: one row per configuration, for ``dvc plots``;
- ``metrics.json``: top-1 (mean, interval, n) and MFLOPs per variant and sweep configuration, the
  DVC metrics file ``dvc exp show`` and ``dvc metrics diff`` compare.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient

from pipeline import preflight
from pipeline.config import Config
from pipeline.stage import StageError, atomic_dir, csv_text, run_stage
from pipeline.stats import Comparison, Estimate, compare, estimate
from pipeline.locations import redact
from pipeline.tracking import tracking_uri
from sasa.models import FORMS
from sasa.paper import STEM_ABLATION, TABLE1, TABLE3, TABLE4, TABLE5

REPORTS = Path("reports")
SWEEP_RESULTS = Path("sweep/results.csv")
# one marker per form with SASA, per other attention mixer, and per model family beyond the ResNets
# (a configuration's "kind")
MARKERS = {"conv": "o", "conv_stem_attention": "s", "full_attention": "^", "halo": "P", "bot": "X", "neighborhood": "v",
           "aa": "<", "san_pairwise": "h", "san_patchwise": "H", "other": "D",
           "ViT": "*", "MaxViT": "p", "CoAtNet": "8", "LeViT": "d", "MViTv2": ">", "CvT": "$C$", "ST-MoE": "$M$"}
STEM_MARKERS = {"conv": "o", "attention": "^", "attention_plain": "v", "attention_conv_values": "s"}
DEPTH_NAMES = {"resnet26": "ResNet-26", "resnet38": "ResNet-38", "resnet50": "ResNet-50"}
# what only attention uses: irrelevant to a network with a conv stem and no attention group
ATTENTION_ONLY = ("kernel_size", "heads", "pos_enc", "mixer", "mixer_args")


# ---------------------------------------------------------------------------------------------
# Runs and configurations


@dataclass
class Configuration:
    """One configuration: an architecture trained by one recipe, over one or more seeds."""

    arch: dict
    params: int
    mflops: float
    runs: dict[int, dict] = field(default_factory=dict)  # seed -> its latest run
    names: set[str] = field(default_factory=set)  # the variants and sweep points that trained it
    trials: set[tuple[str, str]] = field(default_factory=set)  # (sweep, swept values) of its trials

    @property
    def is_resnet(self) -> bool:
        return is_resnet(self.arch)

    @property
    def attends(self) -> bool:
        return not self.is_resnet or bool(self.arch["attention_groups"]) or self.arch["stem"] != "conv"

    @property
    def kind(self) -> str:
        """The plot's marker: the SASA form, the attention mixer, or the model family."""
        if not self.is_resnet:
            return family_of(self.arch)
        if self.arch["attention_groups"] and self.arch["mixer"] != "sasa":
            return self.arch["mixer"]
        return paper_form(self.arch) or "other"

    def top1(self) -> dict[int, float]:
        return {seed: r["top1"] for seed, r in self.runs.items()}

    def estimate(self) -> Estimate:
        return estimate(list(self.top1().values()))

    def label(self) -> str:
        return ", ".join(sorted(self.names))


def is_resnet(arch: dict) -> bool:
    """The paper's tables compare ResNets; other families (transformers) are in the plot and lists."""
    return "attention_groups" in arch


def family_of(arch: dict) -> str:
    """ViT, MaxViT, ... (timm models record theirs), CvT; "ST-MoE" where the MLPs are sparse experts."""
    if arch.get("moe") is not None:
        return "ST-MoE"
    return arch.get("family") or ("CvT" if arch["model"].startswith("cvt") else arch["model"])


def paper_form(arch: dict) -> str | None:
    """The Table 1 form whose stem and attention groups (with SASA) this architecture has, if any."""
    if not is_resnet(arch):
        return None
    for name, form in FORMS.items():
        if arch["stem"] == form["stem"] and tuple(arch["attention_groups"]) == tuple(form["attention_groups"]):
            if not form["attention_groups"] or arch["mixer"] == "sasa":
                return name
    return None


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(run) -> dict:
    """One run as the report needs it (runs logged before ``num_params`` have ``params``)."""
    m, tags = run.data.metrics, run.data.tags
    arch = {k.split("/", 1)[1]: json.loads(v) for k, v in run.data.params.items() if k.startswith("resolved/")}
    if is_resnet(arch):
        arch["attention_groups"] = tuple(arch["attention_groups"])
    sweep, values = tags.get("sasa.sweep", "?"), tags.get("sasa.trial_values")
    if "sasa.variant" in tags:
        name = tags["sasa.variant"]
    else:  # a trial, by its sweep and swept values (trials logged before those were tagged: the sweep alone)
        name = f"{sweep} {values}" if values else f"sweep {sweep}"
    return {
        "run_id": run.info.run_id, "kind": tags["sasa.kind"], "name": name, "seed": int(tags["sasa.seed"]),
        "trial": (sweep, values) if values else None,
        "arch_hash": tags["sasa.arch"], "arch": arch, "params": int(m.get("num_params", m.get("params"))), "mflops": m["flops"] / 1e6,
        "top1": 100 * m["top1"], "top5": 100 * m.get("top5", math.nan),
        "images_per_s": m.get("throughput_images_per_s", math.nan), "start_time": run.info.start_time,
    }


def load_runs(cfg: Config) -> tuple[dict[str, list[dict]], list[Configuration]]:
    """The current variants' runs (every seed must have one) and every configuration of the
    current recipe that finished runs cover."""
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        raise StageError(f"no MLflow experiment {cfg.mlflow.experiment!r} at {redact(tracking_uri(cfg))}: run the train stage first")
    exp_id = experiment.experiment_id
    variants, missing = {}, []
    for variant in cfg.models.variants:
        variants[variant] = []
        for seed in cfg.train.seeds:
            found = client.search_runs(
                [exp_id],
                filter_string=(f"tags.`sasa.kind` = 'train' and tags.`sasa.fingerprint` = '{cfg.fingerprint(variant, seed)}' "
                               "and attributes.status = 'FINISHED'"),
                order_by=["attributes.start_time DESC"], max_results=1,
            )
            if found:
                variants[variant].append(_row(found[0]))
            else:
                missing.append(f"{variant} (seed {seed})")
    if missing:
        raise StageError(f"no finished MLflow run with the current configuration for: {', '.join(missing)} (run dvc repro)")

    configs = {}  # (recipe, architecture) -> its configuration, with the latest finished run of each seed
    for recipe in dict.fromkeys([cfg.recipe(cfg.train), cfg.recipe(cfg.trial_train())]):
        for run in _search(client, exp_id, f"tags.`sasa.recipe` = '{recipe}' and attributes.status = 'FINISHED'"):
            if run.data.tags.get("sasa.kind") not in ("train", "sweep_trial") or "top1" not in run.data.metrics:
                continue
            row = _row(run)
            c = configs.setdefault((recipe, row["arch_hash"]), Configuration(row["arch"], row["params"], row["mflops"]))
            c.names.add(row["name"])
            if row["trial"]:
                c.trials.add(row["trial"])
            if row["seed"] not in c.runs or row["start_time"] > c.runs[row["seed"]]["start_time"]:
                c.runs[row["seed"]] = row
    return variants, sorted(configs.values(), key=lambda c: c.mflops)


def load_sweep(path: Path = SWEEP_RESULTS) -> list[dict]:
    if not path.is_file():
        raise StageError(f"{path} is missing: run the sweep stage first (dvc repro sweep)")
    rows = list(csv.DictReader(path.open()))
    if not rows:
        raise StageError(f"{path} has no trials")
    for r in rows:
        r.update(kernel_size=int(r["kernel_size"]) if r["kernel_size"] else None, stem=r["stem"] or None, params=int(r["params"]), mflops=float(r["mflops"]), seed=int(r["seed"]),
                 top1=float(r["top1"]), epochs=int(r["epochs"]), stopped_early=r["stopped_early"] == "True")
    return rows


# ---------------------------------------------------------------------------------------------
# The paper's tables: configurations that differ in one factor alone


@dataclass(frozen=True)
class Table:
    title: str
    factor: tuple[str, ...]  # the architecture keys the table varies
    wanted: object  # which configurations belong to it
    baseline: str  # how the row every other is compared with is chosen (described in the report)
    how: str  # the params that produce it
    paper: str  # what the paper's numbers are
    needs: object = lambda c: True  # a block shows only if one of its configurations has this


TABLES = [
    Table("Table 1: depth and form", ("model", "stem", "attention_groups"), lambda c: paper_form(c.arch) is not None,
          "the conv form of the same depth", "variants of `form: conv | conv_stem_attention | full_attention` "
          "(and `model: resnet26 | resnet38 | resnet50`), e.g. the default params.yaml or configs/imagenet.yaml",
          "ImageNet, 224 px, full-width models"),
    Table("Table 3: which groups hold attention", ("attention_groups",),
          lambda c: c.arch["stem"] == "conv" and (not c.arch["attention_groups"] or c.arch["mixer"] == "sasa"),
          # all conv against attention everywhere is Table 1's comparison: this table needs a mixed row
          "all-conv groups (the conv form)", "`sweep.space: {attention_groups: [[4], [3, 4], [2, 3, 4], ...]}` "
          "(configs/table3.yaml)", "ResNet-50, conv stem, top-1 on a held-out 4% of ImageNet's training set",
          needs=lambda c: tuple(c.arch["attention_groups"]) not in ((), (1, 2, 3, 4))),
    Table("Table 4: spatial extent k", ("kernel_size",), lambda c: c.attends and c.arch["mixer"] == "sasa",
          "the best k", "`sweep.space: {kernel_size: [3, 5, 7, 9, 11]}` (configs/imagenet.yaml, configs/cpu_study.yaml)",
          "ResNet-50, conv stem, attention in every group, ImageNet"),
    Table("Table 5: positional encoding", ("pos_enc",), lambda c: c.attends and c.arch["mixer"] == "sasa",
          "relative (the paper's)", "`sweep.space: {pos_enc: [none, absolute, relative]}` (configs/table5.yaml)",
          "ResNet-50, held-out 4% of ImageNet's training set"),
    Table("Stem ablation", ("stem",), lambda c: bool(c.arch["attention_groups"]) and c.arch["mixer"] == "sasa",
          "the spatially-aware attention stem (the paper's)",
          "`sweep.space: {stem: [conv, attention_plain, attention_conv_values, attention]}` (configs/stem_ablation.yaml)",
          "ResNet-50, attention in every group, ImageNet"),
]


def _context(c: Configuration, factor) -> tuple:
    """What a configuration is besides the table's factor; a network without attention has no
    attention settings, so its context leaves them out (it joins every attention context)."""
    drop = set(factor) | (set(ATTENTION_ONLY) if not c.attends else set())
    return tuple(sorted((k, json.dumps(v)) for k, v in c.arch.items() if k not in drop))


def blocks(table: Table, configs: list[Configuration]) -> list[list[Configuration]]:
    """Groups of configurations that differ in the table's factor alone, each with two or more values."""
    members = [c for c in configs if c.is_resnet and table.wanted(c)]
    groups = defaultdict(list)
    for c in members:
        if c.attends:
            groups[_context(c, table.factor)].append(c)
    for c in members:
        if not c.attends:
            reduced = dict(_context(c, table.factor))
            homes = [ctx for ctx in groups if any(m.attends for m in groups[ctx])
                     and all(dict(ctx).get(k) == v for k, v in reduced.items())]
            for ctx in homes or [_context(c, table.factor)]:
                groups[ctx].append(c)
    return [g for g in groups.values() if len({_factor_value(c, table.factor) for c in g}) > 1 and any(table.needs(c) for c in g)]


def _factor_value(c: Configuration, factor) -> tuple:
    return tuple(json.dumps(c.arch[k]) for k in factor)


def _differing(block: list[Configuration], found: list[list[Configuration]], factor) -> str:
    """What sets this block apart from the table's other blocks (empty for a table of one block)."""
    def context(b):
        return dict(_context(next((c for c in b if c.attends), b[0]), factor))

    contexts, mine = [context(b) for b in found], context(block)
    keys = [k for k in mine if any(ctx.get(k) != mine[k] for ctx in contexts)]
    return ", ".join(f"{k} = {json.loads(mine[k])}" for k in keys)


def _fmt_groups(groups) -> str:
    return ", ".join(map(str, groups)) if groups else "none (all conv)"


def _verdict(c: Configuration, base: Configuration) -> Comparison | None:
    return None if c is base else compare(c.top1(), base.top1())


def _comparison_cell(c: Configuration, base: Configuration, verdicts: list) -> str:
    result = _verdict(c, base)
    if result is None:
        return "baseline"
    verdicts.append(result)
    return result.verdict()


def table1_lines(block, table, verdicts) -> list[str]:
    depths = [d for d in DEPTH_NAMES if any(c.arch["model"] == d for c in block)]
    lines = ["| form | depth | MFLOPs | params (M) | top-1 % (mean ± 95% CI) | vs conv | paper: GFLOPs / M params / top-1 |",
             "|---|---|---|---|---|---|---|"]
    for form in FORMS:
        for d in depths:
            cells = [c for c in block if paper_form(c.arch) == form and c.arch["model"] == d]
            base = next((c for c in block if paper_form(c.arch) == "conv" and c.arch["model"] == d), None)
            for c in cells:
                vs = _comparison_cell(c, base, verdicts) if base else "no conv run of this depth"
                paper = "{:.1f} / {:.1f} / {:.1f}".format(*TABLE1[(d, form)]) if (d, form) in TABLE1 else "-"
                lines.append(f"| {form.replace('_', ' ')} | {DEPTH_NAMES[d]} | {c.mflops:.1f} | {c.params / 1e6:.3f} | {c.estimate()} | {vs} | {paper} |")
    return lines


def factor_lines(block, table, verdicts) -> list[str]:
    (key,) = table.factor
    if key == "kernel_size":
        base = max(block, key=lambda c: c.estimate().mean)
    else:
        preferred = {"attention_groups": (), "pos_enc": "relative", "stem": "attention"}[key]
        base = next((c for c in block if c.arch[key] == preferred), block[0])
    order = sorted(block, key=lambda c: (len(c.arch[key]), c.arch[key]) if key == "attention_groups" else (0, c.arch[key]))
    lines = [f"| {key} | MFLOPs | params (M) | top-1 % (mean ± 95% CI) | vs baseline | paper |", "|---|---|---|---|---|---|"]
    for c in order:
        value = c.arch[key]
        if key == "attention_groups":
            shown, paper = _fmt_groups(value), TABLE3.get(tuple(value))
            paper = "{:.1f} G / {:.1f} M / {:.1f}".format(*paper) if paper else "-"
        elif key == "kernel_size":
            shown, paper = str(value), TABLE4.get(value)
            paper = "{:.1f} G / {:.1f} M / {:.1f}".format(*paper) if paper else "-"
        elif key == "pos_enc":
            shown, paper = str(value), TABLE5.get(value)
            paper = "{:.1f} G / {:.1f}".format(*paper) if paper else "-"
        else:
            shown, paper = str(value), STEM_ABLATION.get(value)
            paper = f"{paper:.1f}" if paper else "-"
        lines.append(f"| {shown} | {c.mflops:.1f} | {c.params / 1e6:.3f} | {c.estimate()} | {_comparison_cell(c, base, verdicts)} | {paper} |")
    return lines


def tables_markdown(configs: list[Configuration]) -> tuple[list[str], list[Comparison]]:
    lines, verdicts, absent = [], [], []
    for table in TABLES:
        found = blocks(table, configs)
        if not found:
            absent.append(f"- *{table.title}*: no runs differ in `{'`, `'.join(table.factor)}` alone; produce it with {table.how}.")
            continue
        lines += ["", f"## {table.title}", "",
                  f"Baseline of each comparison: {table.baseline}. Paper: {table.paper}."]
        for block in found:
            where = _differing(block, found, table.factor)
            lines += ["", f"*{where}*", ""] if where else [""]
            render = table1_lines if table.factor[0] == "model" else factor_lines
            lines += render(block, table, verdicts)
    lines += families_lines(configs, verdicts)
    if absent:
        lines += ["", "## Tables without runs", "", *absent]
    return lines, verdicts


def families_lines(configs: list[Configuration], verdicts: list) -> list[str]:
    """Every configuration beyond the ResNets (ViT, CvT, ...) against the conv ResNet of the same
    recipe (the one with the most seeds), paired by seed."""
    others = [c for c in configs if not c.is_resnet]
    if not others:
        return []
    convs = [c for c in configs if paper_form(c.arch) == "conv"]
    base = max(convs, key=lambda c: (len(c.runs), c.mflops)) if convs else None
    where = f"the conv {DEPTH_NAMES.get(base.arch['model'], base.arch['model'])} ({base.label()})" if base else "none: no conv ResNet run"
    lines = ["", "## Model families beyond the ResNets", "", f"Baseline: {where}, same recipe and data.", "",
             "| family | configuration | MFLOPs | params (M) | top-1 % (mean ± 95% CI) | vs conv |", "|---|---|---|---|---|---|"]
    for c in sorted(others, key=lambda c: c.mflops):
        vs = _comparison_cell(c, base, verdicts) if base else "-"
        lines.append(f"| {c.kind} | {c.label()} | {c.mflops:.1f} | {c.params / 1e6:.3f} | {c.estimate()} | {vs} |")
    return lines


# ---------------------------------------------------------------------------------------------
# Figures


def pareto_front(points):
    """Points not beaten by a cheaper-or-equal, at-least-as-accurate one, by increasing cost."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6.4, 4.4), dpi=120)


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _error(e: Estimate) -> float:
    return 0.0 if math.isnan(e.half_width) else e.half_width


def plot(configs: list[Configuration], x_of, x_label, label_points) -> bytes:
    """Mean top-1 with its 95% interval against cost, one marker per kind, Pareto front of the means."""
    plt, fig, ax = _figure()
    for kind in sorted({c.kind for c in configs}):
        pts = [c for c in configs if c.kind == kind]
        ests = [c.estimate() for c in pts]
        ax.errorbar([x_of(c) for c in pts], [e.mean for e in ests], yerr=[_error(e) for e in ests], marker=MARKERS.get(kind, "D"), linestyle="none",
                    markersize=7, capsize=3, label=kind.replace("_", " "))
    front = pareto_front([(x_of(c), c.estimate().mean) for c in configs])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.5", linestyle="--", linewidth=1, label="Pareto front (means)")
    if label_points:
        for c in configs:
            ax.annotate(c.label(), (x_of(c), c.estimate().mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.margins(x=0.12)  # room for the labels of the rightmost points
    ns = sorted({c.estimate().n for c in configs})
    ax.set_title(f"mean and 95% interval over seeds (n = {', '.join(map(str, ns))})", fontsize=9)
    ax.set_xlabel(x_label)
    ax.set_ylabel("val top-1 at the last epoch (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return _png(plt, fig)


def plot_sweep(rows) -> bytes:
    """The sweep's configurations (trials pooled over seeds): colour = spatial extent k, marker = stem."""
    plt, fig, ax = _figure()
    pooled = defaultdict(list)
    for r in rows:
        pooled[(r["kernel_size"], r["stem"], r["mflops"])].append(r["top1"])
    ks = sorted({r["kernel_size"] for r in rows}, key=lambda k: (k is None, k or 0))
    colours = dict(zip(ks, plt.cm.viridis([0.85 * i / max(1, len(ks) - 1) for i in range(len(ks))])))  # no pale yellow
    for (k, stem, mflops), values in pooled.items():
        e = estimate(values)
        ax.errorbar([mflops], [e.mean], yerr=[_error(e)], color=colours[k], fmt=STEM_MARKERS.get(stem, "D"), markersize=7, capsize=3)
    for k in ks:
        ax.scatter([], [], color=colours[k], marker="s", label=f"k = {k}" if k is not None else "no window (not a ResNet)")
    for stem in sorted({r["stem"] for r in rows if r["stem"] is not None}):
        ax.scatter([], [], color="0.4", marker=STEM_MARKERS.get(stem, "D"), label=f"{stem} stem")
    ax.set_xlabel("FLOPs per image (M)")
    ax.set_ylabel("val top-1 at the last epoch (%)")
    ax.set_title("sweep trials: mean and 95% interval over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # outside: never hides a point
    return _png(plt, fig)


# ---------------------------------------------------------------------------------------------
# The report


def _mixer_cell(arch) -> str:
    """``halo (3, 4)``: what fills the bottlenecks' 3x3 position, and in which groups (a family
    beyond the ResNets: its name)."""
    if not is_resnet(arch):
        return family_of(arch)
    groups = arch["attention_groups"]
    return "-" if not groups else f"{arch['mixer']} ({', '.join(map(str, groups))})"


def variants_lines(cfg: Config, variants: dict[str, list[dict]]) -> list[str]:
    lines = ["", "## Every variant", "",
             "| variant | model | stem | mixer (groups) | params | MFLOPs | top-1 % (mean ± 95% CI) | per seed | top-5 % | train images/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in sorted(variants.items(), key=lambda kv: kv[1][0]["mflops"]):
        r0, e = runs[0], estimate([r["top1"] for r in runs])
        per_seed = ", ".join(f"{r['seed']}: {r['top1']:.2f}" for r in runs)
        top5 = sum(r["top5"] for r in runs) / len(runs)
        rate = sorted(r["images_per_s"] for r in runs)[len(runs) // 2]
        lines.append(f"| {name} | {r0['arch']['model']} | {r0['arch'].get('stem', '-')} | {_mixer_cell(r0['arch'])} | {r0['params']:,} | "
                     f"{r0['mflops']:.1f} | {e} | {per_seed} | {top5:.2f} | {rate:.0f} |")
    return lines


def sweep_lines(rows, cfg: Config) -> list[str]:
    keys = list(cfg.sweep.space)
    lines = [
        "", "## Sweep trials", "",
        f"Ray Tune sweep `{cfg.sweep.name}` over {', '.join(f'`{k}`' for k in keys)} from variant `{cfg.sweep.base}`, "
        f"each point once per seed ({len(rows)} trials, {cfg.sweep.scheduler.type.upper()} scheduler). Trials that ran every "
        "epoch are pooled into the tables above with the variants of the same architecture; trials an ASHA scheduler "
        "stopped early are listed here only (top-1 at the epoch they stopped at).", "",
        "![sweep](sweep_accuracy_vs_flops.png)", "",
        "| trial | " + " | ".join(keys) + " | seed | MFLOPs | params | top-1 % (last epoch) | best epoch's top-1 % | epochs | node |",
        "|---|" + "---|" * (len(keys) + 7),
    ]
    for r in rows:
        lines.append(
            f"| `{r['trial_id']}` | " + " | ".join(str(r.get(k, "")) for k in keys)
            + f" | {r['seed']} | {r['mflops']:.1f} | {r['params']:,} | {r['top1']:.2f} | {float(r['best_epoch_top1']):.2f} | "
            f"{r['epochs']}{' (stopped)' if r['stopped_early'] else ''} | {r['node_ip']} |"
        )
    return lines


def markdown(cfg: Config, variants, configs, sweep_rows) -> tuple[str, list[Comparison]]:
    table_lines, verdicts = tables_markdown(configs)
    resolved = sum(v.resolved for v in verdicts)
    lines = [
        "# Results",
        "",
        f"Dataset `{cfg.data.source}` at {cfg.data.resolution} px, {cfg.train.epochs} epochs, seeds {cfg.train.seeds}; runs read "
        f"from MLflow (`{redact(tracking_uri(cfg))}`, experiment `{cfg.mlflow.experiment}`), {len(configs)} configurations from "
        f"{sum(len(c.runs) for c in configs)} runs. FLOPs = 2 x multiply-adds per image at the training resolution. Top-1 is the "
        "last epoch's. Each cell: mean ± half-width of the 95% t-interval over seeds (n runs). A difference from a baseline is "
        "*resolved* when its test gives p < 0.05: a paired t-test over the seeds both share, else Welch's t-test; each row is "
        f"one test, not corrected for the several a table makes. Here: {resolved} of {len(verdicts)} comparisons resolved, "
        f"{len(verdicts) - resolved} within noise.",
        "",
        "![top-1 vs FLOPs](accuracy_vs_flops.png)",
        *table_lines,
        *variants_lines(cfg, variants),
        *sweep_lines(sweep_rows, cfg),
    ]
    return "\n".join(lines) + "\n", verdicts


def csv_rows(configs: list[Configuration]) -> list[dict]:
    rows = []
    for c in configs:
        e = c.estimate()
        rows.append({"configuration": c.label(), "kind": c.kind, "model": c.arch["model"], "stem": c.arch.get("stem", ""),
                     "attention_groups": " ".join(map(str, c.arch.get("attention_groups", ()))), "mixer": c.arch.get("mixer", ""),
                     "kernel_size": c.arch.get("kernel_size", ""), "pos_enc": c.arch.get("pos_enc", ""), "params": c.params,
                     "mflops": round(c.mflops, 3), "top1": round(e.mean, 3), "top1_ci95": round(e.half_width, 3), "n": e.n,
                     "run_ids": " ".join(r["run_id"] for r in c.runs.values())})
    return rows


def metrics_summary(cfg: Config, variants: dict[str, list[dict]], configs: list[Configuration]) -> dict:
    """``metrics.json``, what ``dvc exp show`` / ``dvc metrics diff`` compare: each current variant,
    and each configuration of the current sweep (``NAME kernel_size=5``), as top-1 % (mean), its
    95% interval half-width, n seeds and MFLOPs."""
    def entry(top1: list[float], mflops: float) -> dict:
        e = estimate(top1)
        interval = None if math.isnan(e.half_width) else round(e.half_width, 3)  # one seed: no interval (JSON has no NaN)
        return {"top1": round(e.mean, 3), "top1_ci95": interval, "n": e.n, "mflops": round(mflops, 3)}

    summary = {name: entry([r["top1"] for r in runs], runs[0]["mflops"]) for name, runs in variants.items()}
    for c in configs:
        for sweep, values in c.trials:
            if sweep == cfg.sweep.name:
                summary[f"{sweep} {values}"] = entry(list(c.top1().values()), c.mflops)  # DVC reads [..] as an index
    return summary


def report(cfg: Config, out: Path = REPORTS):
    preflight.tracking(cfg)
    (variants, configs), sweep_rows = load_runs(cfg), load_sweep()
    text, verdicts = markdown(cfg, variants, configs, sweep_rows)
    with atomic_dir(out) as tmp:
        (tmp / "accuracy_vs_flops.png").write_bytes(plot(configs, lambda c: c.mflops, "FLOPs per image (M)", cfg.report.label_points))
        (tmp / "accuracy_vs_params.png").write_bytes(plot(configs, lambda c: c.params / 1e6, "parameters (M)", cfg.report.label_points))
        (tmp / "sweep_accuracy_vs_flops.png").write_bytes(plot_sweep(sweep_rows))
        (tmp / "results.md").write_text(text)
        (tmp / "results.csv").write_text(csv_text(csv_rows(configs)))
        (tmp / "metrics.json").write_text(json.dumps(metrics_summary(cfg, variants, configs), indent=2))
    for c in configs:
        print(f"{c.label()}: top-1 {c.estimate()}")
    print(f"{sum(v.resolved for v in verdicts)} of {len(verdicts)} comparisons with a baseline resolved (p < 0.05), the rest within noise")
    print(f"wrote {out}/results.md, results.csv, metrics.json and the plots accuracy_vs_flops, accuracy_vs_params, sweep_accuracy_vs_flops")


def main(argv=None):
    run_stage(__doc__.splitlines()[0], lambda cfg, args: report(cfg), argv=argv, builds=())  # trains nothing: builds no model


if __name__ == "__main__":
    main()
