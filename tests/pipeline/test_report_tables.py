"""The report's tables, figures' pure parts and writers from hand-built configurations: which runs
each table groups, the baseline it compares with and the verdicts, without training or MLflow."""

from types import SimpleNamespace

import pytest

from pipeline.report.figures import FALLBACK_MARKERS, FAMILY_MARKERS, FORM_MARKERS, marker, pareto_front
from pipeline.report.render import csv_rows, markdown, metrics_summary, tables_markdown
from pipeline.report.runs import run_record
from pipeline.report.tables import TABLES, Configuration, paper_tables
from pipeline.tasks import TASKS
from sasa.layers.mixers import MIXER_INFO
from sasa.models import FORMS
from sasa.models.timm_source import FAMILIES

ALL = (1, 2, 3, 4)
RESNET = {
    "model": "resnet26",
    "stem": "conv",
    "attention_groups": (),
    "kernel_size": 3,
    "heads": 2,
    "pos_enc": "relative",
    "width": 0.125,
    "small_input": True,
    "zero_init_residual": False,
    "mixer": "sasa",
    "mixer_args": {},
}
VIT = {"model": "timm:vit_tiny_patch16_224", "family": "ViT", "img_size": 28, "patch_size": 4}
CFG = SimpleNamespace(
    data=SimpleNamespace(source="mnist5k", resolution=28, task=TASKS["classification"]),
    train=SimpleNamespace(epochs=2, seeds=[0, 1, 2]),
    mlflow=SimpleNamespace(tracking_uri="http://tracking.example:5000", experiment="test"),
    sweep=SimpleNamespace(name="k", base="csa", space={"kernel_size": [5]}, scheduler=SimpleNamespace(type="fifo")),
)
CONV = {0: 70.0, 1: 71.0, 2: 72.0}
CLEARLY_BETTER = {0: 72.0, 1: 73.1, 2: 73.9}  # conv + 2.0, 2.1, 1.9: resolved
NOISE = {0: 69.0, 1: 72.5, 2: 71.8}  # conv - 1.0, + 1.5, - 0.2: within noise


def resnet(**changes) -> dict:
    return {**RESNET, **changes}


def config(arch: dict, top1: dict[int, float], name: str, trials=(), mflops=100.0) -> Configuration:
    c = Configuration(arch, 1_000_000, mflops, names={name}, trials=set(trials))
    for seed, value in top1.items():
        c.runs[seed] = {
            "run_id": f"{name}-{seed}",
            "seed": seed,
            "task": "classification",
            "score": value,
            "results": {"top1": value, "top5": value + 20},
            "mflops": mflops,
            "params": 1_000_000,
            "arch": arch,
            "images_per_s": 100.0,
        }
    return c


def section(tables, title):
    (found,) = [s for s in tables.sections if s.title.startswith(title)]
    return found


def rows_by_lead(block) -> dict:
    return {r.lead: r for r in block.rows}


def test_table1_compares_each_form_with_the_conv_of_its_depth_and_tells_resolved_from_noise():
    conv, csa = config(resnet(), CONV, "conv"), config(resnet(attention_groups=ALL), CLEARLY_BETTER, "csa")
    full = config(resnet(stem="attention", attention_groups=ALL), NOISE, "full")
    csa38 = config(resnet(model="resnet38", attention_groups=ALL), CONV, "csa38")
    tables = paper_tables([conv, csa, full, csa38])
    (block,) = section(tables, "Table 1").blocks
    rows = rows_by_lead(block)
    assert list(rows) == [
        ("conv", "ResNet-26"),
        ("conv stem attention", "ResNet-26"),
        ("conv stem attention", "ResNet-38"),
        ("full attention", "ResNet-26"),
    ]
    assert rows["conv", "ResNet-26"].comparison is None and rows["conv", "ResNet-26"].note == "baseline"

    better = rows["conv stem attention", "ResNet-26"].comparison
    assert better.resolved and better.difference == pytest.approx(2.0) and better.p < 0.01
    assert better.test == "paired t-test over seeds" and better.n == "n = 3 pairs"
    noise = rows["full attention", "ResNet-26"].comparison
    assert not noise.resolved and noise.difference == pytest.approx(0.1) and noise.p > 0.5
    deeper = rows["conv stem attention", "ResNet-38"]
    assert deeper.comparison is None and deeper.note == "no conv run of this depth"
    assert rows["conv stem attention", "ResNet-26"].paper == "4.5 / 10.3 / 75.8"

    md = "\n".join(tables_markdown(tables))
    cells = [
        "conv stem attention",
        "ResNet-26",
        "100.0",
        "1.000",
        "73.00 ± 2.37 (n=3)",
        better.verdict(),
        "4.5 / 10.3 / 75.8",
    ]
    assert "| " + " | ".join(cells) + " |" in md.splitlines()
    assert (
        "+2.00 ± 0.25, resolved (paired t-test over seeds" in md
        and "+0.10 ± 3.17, within noise (paired t-test over seeds, p = 0.905" in md
    )


def test_the_markdown_counts_the_comparisons_the_tables_made():
    configs = [
        config(resnet(), CONV, "conv"),
        config(resnet(attention_groups=ALL), CLEARLY_BETTER, "csa"),
        config(resnet(stem="attention", attention_groups=ALL), NOISE, "full"),
    ]
    tables = paper_tables(configs)
    # Table 1 makes two comparisons with conv; the stem ablation one (conv stem against the attention stem)
    assert [c.resolved for c in tables.comparisons()] == [True, False, False]
    variants = {min(c.names): list(c.runs.values()) for c in configs}
    text = markdown(CFG, variants, configs, [], tables)
    assert "3 configurations from 9 runs" in text and "Here: 1 of 3 comparisons resolved, 2 within noise." in text


def test_conv_configuration_joins_every_attention_context():
    conv = config(resnet(), CONV, "conv")
    k3, k5 = (
        config(resnet(attention_groups=ALL), CLEARLY_BETTER, "k3"),
        config(resnet(attention_groups=ALL, kernel_size=5), NOISE, "k5"),
    )
    table1 = section(paper_tables([conv, k3, k5]), "Table 1")
    assert [b.where for b in table1.blocks] == ["kernel_size = 3", "kernel_size = 5"]
    for block, attention in zip(table1.blocks, (k3, k5)):
        assert [r.config for r in block.rows] == [conv, attention]
        assert block.rows[1].comparison.difference == pytest.approx(attention.estimate().mean - 71.0)
    (table4,) = section(paper_tables([conv, k3, k5]), "Table 4").blocks
    assert conv not in [r.config for r in table4.rows]


def test_table3_needs_a_row_with_attention_in_some_groups_only():
    conv, everywhere = config(resnet(), CONV, "conv"), config(resnet(attention_groups=ALL), CLEARLY_BETTER, "all")
    tables = paper_tables([conv, everywhere])
    assert "Table 3: which groups hold attention" in [t.title for t in tables.without_runs]

    mixed = config(resnet(attention_groups=(3, 4)), NOISE, "g34")
    (block,) = section(paper_tables([conv, everywhere, mixed]), "Table 3").blocks
    assert [r.lead for r in block.rows] == [("none (all conv)",), ("3, 4",), ("1, 2, 3, 4",)]
    assert [r.note for r in block.rows if r.comparison is None] == ["baseline"] and block.rows[0].config is conv
    assert [r.paper for r in block.rows] == ["8.2 G / 25.6 M / 79.5", "7.5 G / 18.5 M / 80.7", "7.0 G / 18.0 M / 80.2"]


def test_table4_baseline_is_the_best_k():
    k3 = config(resnet(attention_groups=ALL), {0: 70.0, 1: 70.5}, "k3")
    k5 = config(resnet(attention_groups=ALL, kernel_size=5), {0: 73.0, 1: 73.2}, "k5")
    k7 = config(resnet(attention_groups=ALL, kernel_size=7), {0: 72.0, 1: 72.4}, "k7")
    (block,) = section(paper_tables([k7, k3, k5]), "Table 4").blocks
    assert [r.lead for r in block.rows] == [("3",), ("5",), ("7",)]
    assert block.rows[1].comparison is None and block.rows[1].note == "baseline"
    assert block.rows[0].comparison.difference == pytest.approx(-2.85)
    assert block.rows[2].comparison.difference == pytest.approx(-0.9)
    assert block.rows[0].paper == "6.6 G / 18.0 M / 76.4"


def test_table5_baseline_is_relative_whatever_scores_best():
    relative = config(resnet(attention_groups=ALL), CONV, "rel")
    absolute = config(resnet(attention_groups=ALL, pos_enc="absolute"), CLEARLY_BETTER, "abs")
    none = config(resnet(attention_groups=ALL, pos_enc="none"), {0: 60.0}, "none")
    (block,) = section(paper_tables([absolute, none, relative]), "Table 5").blocks
    rows = rows_by_lead(block)
    assert list(rows) == [("absolute",), ("none",), ("relative",)]
    assert rows["relative",].note == "baseline" and rows["absolute",].comparison.difference == pytest.approx(2.0)
    assert rows["none",].comparison.test == "a single run has no spread" and rows["none",].paper == "6.9 G / 77.6"


def test_stem_ablation_baseline_is_the_attention_stem():
    attention = config(resnet(stem="attention", attention_groups=ALL), CONV, "full")
    plain = config(resnet(stem="attention_plain", attention_groups=ALL), NOISE, "plain")
    conv_stem = config(resnet(attention_groups=ALL), CLEARLY_BETTER, "csa")
    (block,) = section(paper_tables([conv_stem, plain, attention]), "Stem ablation").blocks
    rows = rows_by_lead(block)
    assert rows["attention",].note == "baseline" and rows["attention",].paper == "77.6"
    assert (
        rows["attention_plain",].comparison.difference == pytest.approx(0.1)
        and rows["attention_plain",].paper == "76.2"
    )
    assert rows["conv",].comparison.difference == pytest.approx(2.0) and rows["conv",].paper == "-"


def test_families_compare_with_the_conv_resnet_with_most_seeds():
    conv26, conv38 = (
        config(resnet(), CONV, "conv26"),
        config(resnet(model="resnet38"), {0: 90.0, 1: 90.0}, "conv38", mflops=300.0),
    )
    vit = config(VIT, CLEARLY_BETTER, "vit", mflops=50.0)
    cvt = config({"model": "cvt13", "depths": [1, 1]}, {0: 65.0}, "cvt", mflops=60.0)
    moe = config({**VIT, "moe": {"experts": 4}}, NOISE, "moe", mflops=70.0)
    families = section(paper_tables([conv26, conv38, vit, cvt, moe]), "Model families")
    assert families.intro == "Baseline: the conv ResNet-26 (conv26), same recipe and data."
    (block,) = families.blocks
    assert [r.lead for r in block.rows] == [("ViT", "vit"), ("CvT", "cvt"), ("ST-MoE", "moe")]
    assert block.rows[0].comparison.difference == pytest.approx(2.0) and block.rows[0].comparison.resolved
    assert block.rows[1].comparison.test == "a single run has no spread"  # one seed: nothing to test against
    assert block.rows[2].comparison.difference == pytest.approx(0.1) and not block.rows[2].comparison.resolved

    alone = section(paper_tables([vit]), "Model families")
    assert alone.intro == "Baseline: none: no conv ResNet run, same recipe and data."
    assert [r.note for r in alone.blocks[0].rows] == ["-"] and paper_tables([vit]).comparisons() == []


def test_tables_without_runs_say_which_params_produce_them():
    tables = paper_tables([config(resnet(), CONV, "conv")])
    assert tables.sections == () and tables.without_runs == tuple(TABLES) and tables.comparisons() == []
    lines = tables_markdown(tables)
    assert lines[:3] == ["", "## Tables without runs", ""]
    assert lines[3] == (
        "- *Table 1: depth and form*: no runs differ in `model`, `stem`, `attention_groups` alone; produce it "
        "with variants of `form: conv | conv_stem_attention | full_attention` (and `model: resnet26 | "
        "resnet38 | resnet50`), e.g. the default params.yaml or configs/imagenet.yaml."
    )
    assert len(lines) == 3 + len(TABLES)


def test_metrics_summary_pools_the_current_sweeps_trials_by_configuration():
    conv = config(resnet(), CONV, "conv")
    k5 = config(
        resnet(attention_groups=ALL, kernel_size=5),
        {0: 71.0, 1: 73.0},
        "k kernel_size=5",
        trials={("k", "kernel_size=5"), ("older", "kernel_size=5")},
        mflops=123.4567,
    )
    single = config(
        resnet(attention_groups=ALL, kernel_size=7), {0: 71.0}, "k kernel_size=7", trials={("k", "kernel_size=7")}
    )
    summary = metrics_summary(CFG, {"conv": list(conv.runs.values())}, [conv, k5, single])
    assert set(summary) == {"conv", "k kernel_size=5", "k kernel_size=7"}
    assert summary["k kernel_size=5"] == {"top1": 72.0, "top1_ci95": 12.706, "n": 2, "mflops": 123.457}
    assert summary["k kernel_size=7"]["top1_ci95"] is None and summary["conv"]["n"] == 3


def test_csv_rows_describe_each_configuration():
    rows = csv_rows(
        [config(resnet(attention_groups=(3, 4), mixer="halo"), CONV, "halo"), config(VIT, {0: 50.0}, "vit")]
    )
    assert rows[0]["kind"] == "halo" and rows[0]["attention_groups"] == "3 4" and rows[0]["top1"] == 71.0
    assert rows[1]["kind"] == "ViT" and rows[1]["stem"] == "" and rows[1]["run_ids"] == "vit-0"


def test_run_record_names_variants_and_trials():
    def run(tags, metrics):
        params = {"resolved/model": '"resnet26"', "resolved/attention_groups": "[3, 4]", "resolved/stem": '"conv"'}
        return SimpleNamespace(
            info=SimpleNamespace(run_id="r1", start_time=5),
            data=SimpleNamespace(params=params, tags=tags, metrics=metrics),
        )

    metrics = {"num_params": 1234.0, "flops": 2.5e6, "top1": 0.5}
    common = {"sasa.seed": "1", "sasa.arch": "abc"}
    variant = run_record(run({**common, "sasa.kind": "train", "sasa.variant": "g34"}, metrics))
    assert (variant["name"], variant["trial"], variant["params"], variant["mflops"]) == ("g34", None, 1234, 2.5)
    assert variant["arch"]["attention_groups"] == (3, 4) and variant["score"] == 50.0
    trial = run_record(
        run({**common, "sasa.kind": "sweep_trial", "sasa.sweep": "k", "sasa.trial_values": "kernel_size=5"}, metrics)
    )
    assert trial["name"] == "k kernel_size=5" and trial["trial"] == ("k", "kernel_size=5")


def test_pareto_front_keeps_points_no_cheaper_one_beats():
    points = [(2.0, 40.0), (1.0, 50.0), (2.0, 55.0), (3.0, 55.0), (4.0, 60.0), (0.5, 30.0), (5.0, 58.0)]
    assert pareto_front(points) == [(0.5, 30.0), (1.0, 50.0), (2.0, 55.0), (4.0, 60.0)]
    assert pareto_front([]) == []


def test_every_kind_has_its_own_marker():
    from matplotlib.markers import MarkerStyle

    assert set(FAMILIES.values()) <= set(FAMILY_MARKERS) and set(FORMS) <= set(FORM_MARKERS)
    for name, info in MIXER_INFO.items():
        assert marker(name) == (FORM_MARKERS.get(name) or info.marker)
    # every kind a configuration can have ("sasa" in a form's groups is the form; "conv" the conv form)
    kinds = {*FORM_MARKERS, *FAMILY_MARKERS, *(set(MIXER_INFO) - {"sasa", "conv"})}
    markers = [marker(kind) for kind in kinds]
    assert len(set(markers)) == len(kinds), sorted(zip(markers, kinds))
    for m in [*markers, marker("efficientnet")]:
        MarkerStyle(m)  # raises on anything matplotlib cannot draw
    assert marker("efficientnet") in FALLBACK_MARKERS and marker("efficientnet") == marker("efficientnet")


def detector(**changes) -> dict:
    """A RetinaNet's resolved architecture: the ResNet backbone's keys and what fills its FPN and heads."""
    return {**RESNET, "model": "retinanet_resnet26", "head_mixer": "conv", "fpn_channels": 32, **changes}


def test_table2_crosses_backbone_and_heads_against_the_all_conv_detector_with_cost_ratios():
    def det(name, scores, mflops, params, **arch):
        c = config(detector(**arch), scores, name, mflops=mflops)
        c.params, c.task = params, "detection"
        return c

    conv = det("conv", CONV, 100.0, 1_000_000)
    heads = det("heads", CLEARLY_BETTER, 90.0, 900_000, head_mixer="sasa")
    full = det("full", NOISE, 61.0, 660_000, stem="attention", attention_groups=ALL, head_mixer="sasa")
    csa = det("csa", NOISE, 80.0, 800_000, attention_groups=ALL)
    classifier = config(resnet(), CONV, "classifier")
    tables = paper_tables([conv, heads, full, csa, classifier])
    (block,) = section(tables, "Table 2").blocks
    rows = rows_by_lead(block)
    assert list(rows) == [
        ("conv", "conv"),
        ("conv stem attention", "conv"),
        ("conv", "sasa"),
        ("full attention", "sasa"),
    ]
    assert rows["conv", "conv"].note == "baseline" and rows["conv", "conv"].paper == "1.00x / 1.00x"
    assert rows["conv", "sasa"].comparison.resolved and not rows["full attention", "sasa"].comparison.resolved
    assert rows["full attention", "sasa"].paper == "0.61x / 0.66x (abstract: 0.61x / 0.66x)"
    assert rows["conv stem attention", "conv"].paper == "0.80x / 0.80x"
    assert block.columns[4] == "mAP % (mean ± 95% CI)"
    only_detectors = paper_tables([conv, heads, full, csa])
    assert only_detectors.without_runs == ()  # a detection report lists no classification table as missing
    only_classifiers = paper_tables([classifier])
    assert "Table 2: detection (RetinaNet, FPN + heads x backbone)" in [t.title for t in only_classifiers.without_runs]
    # detectors stay out of the classifiers' tables and the families beyond the ResNets
    others = [r.config for s in tables.sections if not s.title.startswith("Table 2") for b in s.blocks for r in b.rows]
    assert not any(c.is_detector for c in others)
    rows_csv = {r["configuration"]: r for r in csv_rows([conv, classifier])}
    assert rows_csv["conv"]["map"] == 71.0 and rows_csv["conv"]["top1"] == ""
    assert rows_csv["classifier"]["top1"] == 71.0 and rows_csv["classifier"]["map"] == ""
    assert marker(full.kind) == FORM_MARKERS["full_attention"] and full.kind == "full_attention + sasa FPN/heads"


def test_run_record_reads_a_detection_run_by_its_task():
    params = {
        "resolved/model": '"retinanet_resnet26"',
        "resolved/attention_groups": "[]",
        "resolved/head_mixer": '"sasa"',
    }
    metrics = {"num_params": 10.0, "flops": 1e6, "map": 0.25, "map_50": 0.5, "map_large": -1.0}
    tags = {"sasa.seed": "0", "sasa.arch": "x", "sasa.kind": "train", "sasa.variant": "d", "sasa.task": "detection"}
    run = SimpleNamespace(
        info=SimpleNamespace(run_id="r", start_time=1), data=SimpleNamespace(params=params, tags=tags, metrics=metrics)
    )
    record = run_record(run)
    assert record["task"] == "detection" and record["score"] == 25.0 and record["results"]["map_50"] == 50.0
    assert record["results"]["map_large"] != record["results"]["map_large"]  # COCO's -1 (no large objects): NaN


def test_the_budget_section_pairs_each_form_with_the_conv_of_its_length_and_table1_splits_by_length():
    """configs/budget.yaml: the three forms at 2 and 6 epochs (a swept train key). Each form is compared
    with the conv form of its own length; Table 1 gets one block per length; the plot draws the gaps."""
    from pipeline.report.figures import plot_budget
    from pipeline.report.tables import BUDGET

    def at(epochs, arch, top1, name):
        c = config(arch, top1, name)
        c.train = {"epochs": epochs}
        return c

    csa, full = resnet(attention_groups=ALL), resnet(stem="attention", attention_groups=ALL)
    short = [at(2, resnet(), CONV, "conv"), at(2, csa, NOISE, "csa"), at(2, full, {0: 60.0, 1: 62.0, 2: 61.0}, "fa")]
    later = {0: 80.0, 1: 81.0, 2: 82.0}
    long = [at(6, resnet(), later, "b conv"), at(6, csa, {s: v + 2 for s, v in later.items()}, "b csa")]
    tables = paper_tables(short + long)
    (block,) = section(tables, BUDGET).blocks
    rows = rows_by_lead(block)
    assert rows[("2", "ResNet-26", "conv")].note == "baseline"
    assert rows[("2", "ResNet-26", "full attention")].comparison.difference == pytest.approx(-10.0)
    assert rows[("2", "ResNet-26", "full attention")].comparison.resolved
    assert not rows[("2", "ResNet-26", "conv stem attention")].comparison.resolved
    six = rows[("6", "ResNet-26", "conv stem attention")].comparison  # against the 6-epoch conv, not the 2-epoch one
    assert six.difference == pytest.approx(2.0) and six.p == 0.0
    assert [b.where for b in section(tables, "Table 1").blocks] == ["train.epochs = 2", "train.epochs = 6"]
    assert plot_budget(tables.section(BUDGET)).startswith(b"\x89PNG")

    one_length = paper_tables(short)
    assert one_length.section(BUDGET) is None and plot_budget(None).startswith(b"\x89PNG")
