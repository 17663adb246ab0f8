"""The report's tables from small real runs: variants trained by the train stage and trials of a
real Ray Tune sweep, pooled by resolved architecture, with intervals and tests recomputed here from
the runs' own metrics in MLflow."""

import csv

import mlflow
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.report import report
from pipeline.report.render import tables_markdown
from pipeline.report.runs import load_runs
from pipeline.report.tables import TABLES, paper_tables
from pipeline.stats import compare, estimate
from tests.helpers import run_module, write_params

VARIANTS = {
    "conv": {"form": "conv"},
    "csa": {"form": "conv_stem_attention"},
    "full": {"form": "full_attention"},
    "plain": {"form": "full_attention", "stem": "attention_plain"},
    "g34": {"form": "conv", "attention_groups": [3, 4]},
    "abs": {"form": "conv_stem_attention", "pos_enc": "absolute"},
}


def _top1_by_seed(client, experiment_id, tag, value):
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'"
    )
    return {int(r.data.tags["sasa.seed"]): 100 * r.data.metrics["top1"] for r in runs}


def _row(md, section, first_cell, block=None):
    """The table row of ``section`` (of its sub-table headed ``*block*``) whose first cell is ``first_cell``."""
    body = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    if block:
        body = body.split(f"*{block}*", 1)[1].split("\n*", 1)[0]
    (line,) = [line for line in body.splitlines() if line.startswith(f"| {first_cell} |")]
    return line


@pytest.mark.slow
def test_every_table_renders_from_variants_and_sweep_trials(workdir):
    from pipeline.train import train

    write_params(
        workdir,
        {
            "models": {"variants": VARIANTS},
            "train": {"seeds": [0, 1], "epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1},
            "mlflow": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db"},
            "sweep": {
                "base": "csa",
                "space": {"kernel_size": [5]},
                "train": {},
                "scheduler": {"type": "fifo", "grace_period": 1},
            },
        },
    )
    cfg = load_config("params.yaml")
    for variant in VARIANTS:
        train(cfg, variant)
    sweep = run_module("pipeline.sweep", cwd=workdir)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    report(cfg)

    md = (workdir / "reports" / "results.md").read_text()
    for table in TABLES:
        if not table.detectors:  # classification runs only: every classification table, and Table 2 named as missing
            assert f"## {table.title}" in md, table.title
    missing = md.split("## Tables without runs", 1)[1].split("\n## ", 1)[0]
    assert [line for line in missing.splitlines() if line.startswith("- ")] == [
        "- *Table 2: detection (RetinaNet, FPN + heads x backbone)*: no runs differ in `stem`, `attention_groups`, "
        "`head_mixer` alone; produce it with variants of `model: retinanet_resnet26 | 38 | 50` with `form` x "
        "`head_mixer: conv | sasa` on `data.source: digit_canvases | coco` (configs/table2.yaml, configs/coco.yaml)."
    ]

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("test").experiment_id
    by_variant = {v: _top1_by_seed(client, exp, "sasa.variant", v) for v in VARIANTS}
    k5 = _top1_by_seed(client, exp, "sasa.kind", "sweep_trial")
    assert set(k5) == {0, 1} and all(set(v) == {0, 1} for v in by_variant.values())

    # Table 4 pools the k = 3 variant and the k = 5 trials; the baseline is the better mean
    k3_row, k5_row = _row(md, "Table 4", "3"), _row(md, "Table 4", "5")
    assert str(estimate(list(by_variant["csa"].values()))) in k3_row and str(estimate(list(k5.values()))) in k5_row
    best, other = (
        (k3_row, k5_row)
        if estimate(list(by_variant["csa"].values())).mean >= estimate(list(k5.values())).mean
        else (k5_row, k3_row)
    )
    assert "| baseline |" in best and "paired t-test over seeds" in other and "n = 2 pairs" in other
    assert "6.6 G / 18.0 M / 76.4" in k3_row  # the paper's k = 3 beside ours

    # Table 1: each attention form against conv, paired by seed; the conv network has no attention
    # settings, so it is the baseline of every attention context (k = 5 and absolute encodings too)
    expected = compare(by_variant["csa"], by_variant["conv"])
    csa_row = _row(md, "Table 1", "conv stem attention", block="kernel_size = 3, pos_enc = relative")
    assert expected.verdict() in csa_row and "4.5 / 10.3 / 75.8" in csa_row
    full_row = _row(md, "Table 1", "full attention", block="kernel_size = 3, pos_enc = relative")
    assert compare(by_variant["full"], by_variant["conv"]).verdict() in full_row
    assert _row(md, "Table 1", "conv stem attention", block="kernel_size = 5, pos_enc = relative")

    # Table 3, Table 5 and the stem ablation, each against its baseline
    # (Table 3 only where a mixed row is: all conv against all attention is Table 1's comparison)
    assert expected.verdict() in _row(md, "Table 3", "1, 2, 3, 4") and "| baseline |" in _row(
        md, "Table 3", "none (all conv)"
    )
    assert compare(by_variant["g34"], by_variant["conv"]).verdict() in _row(md, "Table 3", "3, 4")
    assert "pos_enc = absolute" not in md.split("## Table 3", 1)[1].split("\n## ", 1)[0]
    assert compare(by_variant["abs"], by_variant["csa"]).verdict() in _row(md, "Table 5", "absolute")
    assert compare(by_variant["plain"], by_variant["full"]).verdict() in _row(md, "Stem ablation", "attention_plain")
    assert "| 76.2 |" in _row(md, "Stem ablation", "attention_plain") and "| baseline |" in _row(
        md, "Stem ablation", "attention"
    )

    rows = list(csv.DictReader((workdir / "reports" / "results.csv").open()))
    assert len(rows) == len(VARIANTS) + 1 and all(r["n"] == "2" for r in rows)  # six variants and the k = 5 trials
    for png in ("accuracy_vs_flops.png", "accuracy_vs_params.png", "sweep_accuracy_vs_flops.png"):
        assert Image.open(workdir / "reports" / png).size[0] > 300

    # with the conv runs alone, no table has two values: each says which params produce it
    _, configs = load_runs(cfg)
    tables = paper_tables([c for c in configs if c.names == {"conv"}])
    absent = [line for line in tables_markdown(tables) if line.startswith("- *")]
    assert not tables.comparisons() and len(absent) == len(TABLES) and all("produce it with" in line for line in absent)
