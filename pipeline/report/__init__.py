"""Stage ``report``: read every tracked run back from MLflow and write the paper's results, with
their uncertainty, to ``reports/``.

Runs are pooled by what they trained, not by what they were called: variants and sweep trials
with the same resolved architecture (``sasa.arch``) and recipe (``sasa.recipe``, the data and
train sections without the seed) are one *configuration*, its runs told apart by seed. Only runs
of the current recipe count (a stale run of another recipe never shows up as a result); sweep
trials count when they ran every epoch (an ASHA-stopped trial trained less). Top-1 (and a
detector's COCO mAP) is the last epoch's everywhere, as in the paper.

- ``results.md``: each of the paper's ablations that the runs cover, beside the paper's numbers:
  Table 1 (depth x form), Table 2 (detection: FPN + heads x backbone, with FLOPs and parameter ratios
  beside the abstract's), Table 3 (attention groups), Table 4 (spatial extent k), Table 5
  (positional encoding) and the stem ablation. A table is a set of configurations that differ in
  its factor alone; every cell is the mean with its 95% interval and n, and every row says whether
  its difference from the table's baseline is resolved or within noise (``pipeline.stats``). A
  table no runs cover is one line saying which params produce it. Then every variant and every
  sweep trial.
- ``accuracy_vs_flops.png`` / ``accuracy_vs_params.png``: every configuration, mean and 95%
  interval as error bars, one marker per form or attention mixer, the Pareto front of the means;
- ``detection_map_vs_flops.png``: the same for detectors (mAP);
- ``sweep_accuracy_vs_flops.png``: the sweep's configurations, coloured by k, marked by stem;
- ``budget_gap_vs_epochs.png``: each attention form's gap to conv against training epochs, when the
  runs cover two or more (configs/budget.yaml);
- ``results.csv``: one row per configuration, for ``dvc plots``;
- ``metrics.json``: top-1 (mean, interval, n) and MFLOPs per variant and sweep configuration, the
  DVC metrics file ``dvc exp show`` and ``dvc metrics diff`` compare.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import preflight
from pipeline.config import Config
from pipeline.console import say
from pipeline.report.figures import plot, plot_budget, plot_sweep
from pipeline.report.render import PLOTS, csv_rows, markdown, metrics_summary
from pipeline.report.runs import load_runs, load_sweep
from pipeline.report.tables import BUDGET, paper_tables
from pipeline.stage import atomic_dir, csv_text, run_stage

REPORTS = Path("reports")

__all__ = ["REPORTS", "main", "report"]


def report(cfg: Config, out: Path = REPORTS):
    preflight.tracking(cfg)
    task = cfg.data.task
    (variants, configs), sweep_rows = load_runs(cfg), load_sweep(task)
    tables = paper_tables(configs)
    classifiers = [c for c in configs if not c.is_detector]
    detectors = [c for c in configs if c.is_detector]
    with atomic_dir(out) as tmp:
        for name, x_of, x_label in (
            ("flops", lambda c: c.mflops, "FLOPs per image (M)"),
            ("params", lambda c: c.params / 1e6, "parameters (M)"),
        ):
            (tmp / f"accuracy_vs_{name}.png").write_bytes(plot(classifiers, x_of, x_label, cfg.report.label_points))
        (tmp / PLOTS["detection"]).write_bytes(
            plot(detectors, lambda c: c.mflops, "FLOPs per image (M)", False, "val mAP")  # the legend names each
        )
        (tmp / "sweep_accuracy_vs_flops.png").write_bytes(plot_sweep(sweep_rows, f"val {task.label.split()[0]}"))
        (tmp / "budget_gap_vs_epochs.png").write_bytes(plot_budget(tables.section(BUDGET)))
        (tmp / "results.md").write_text(markdown(cfg, variants, configs, sweep_rows, tables))
        (tmp / "results.csv").write_text(csv_text(csv_rows(configs)))
        (tmp / "metrics.json").write_text(json.dumps(metrics_summary(cfg, variants, configs), indent=2))
    for c in configs:
        say(f"{c.label()}: {'mAP' if c.is_detector else 'top-1'} {c.estimate()}")
    comparisons = tables.comparisons()
    resolved = sum(v.resolved for v in comparisons)
    say(f"{resolved} of {len(comparisons)} comparisons with a baseline resolved (p < 0.05), the rest within noise")
    say(
        f"wrote {out}/results.md, results.csv, metrics.json and the plots accuracy_vs_flops, accuracy_vs_params, "
        "detection_map_vs_flops, sweep_accuracy_vs_flops, budget_gap_vs_epochs"
    )


def main(argv=None):
    run_stage(__doc__.splitlines()[0], lambda cfg, args: report(cfg), "report", argv=argv)
