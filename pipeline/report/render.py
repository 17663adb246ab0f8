"""What the report writes besides the plots: ``results.md``, the rows of ``results.csv`` and the
``metrics.json`` that DVC compares across experiments."""

from __future__ import annotations

import math

from pipeline.config import Config
from pipeline.locations import redact
from pipeline.report.tables import Block, Configuration, Row, Tables, family_of
from pipeline.stats import estimate
from pipeline.tasks import Task
from pipeline.tracking import tracking_uri


def _cells(row: Row) -> list[str]:
    c = row.config
    vs = row.comparison.verdict() if row.comparison is not None else row.note
    paper = [] if row.paper is None else [row.paper]
    return [*row.lead, f"{c.mflops:.1f}", f"{c.params / 1e6:.3f}", str(c.estimate()), vs, *paper]


def _table(columns, rows) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _block_lines(block: Block) -> list[str]:
    return [*(["", f"*{block.where}*", ""] if block.where else [""]), *_table(block.columns, map(_cells, block.rows))]


def tables_markdown(tables: Tables) -> list[str]:
    lines = []
    for section in tables.sections:
        lines += ["", f"## {section.title}", "", section.intro]
        for block in section.blocks:
            lines += _block_lines(block)
    if tables.without_runs:
        lines += ["", "## Tables without runs", ""]
        lines += [
            f"- *{t.title}*: no runs differ in `{'`, `'.join(t.factor)}` alone; produce it with {t.how}."
            for t in tables.without_runs
        ]
    return lines


def _mixer_cell(arch) -> str:
    """``halo (3, 4)``: what fills the bottlenecks' 3x3 position, and in which groups (a family
    beyond the ResNets: its name)."""
    if "attention_groups" not in arch:  # neither a ResNet nor a detector over one
        return family_of(arch)
    groups = arch["attention_groups"]
    return "-" if not groups else f"{arch['mixer']} ({', '.join(map(str, groups))})"


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def variants_lines(variants: dict[str, list[dict]], task: Task) -> list[str]:
    """Every variant: its task's score over seeds, and the means of its other results (top-5, or
    mAP@50 ... mAP of large objects)."""
    others = task.results[1:]
    columns = (
        "variant",
        "model",
        "stem",
        "mixer (groups)",
        *(["FPN + heads"] if task.name == "detection" else []),
        "params",
        "MFLOPs",
        f"{task.label} (mean ± 95% CI)",
        "per seed",
        *(task.columns[k] for k in others),
        "train images/s",
    )
    rows = []
    for name, runs in sorted(variants.items(), key=lambda kv: kv[1][0]["mflops"]):
        r0, arch = runs[0], runs[0]["arch"]
        rows.append(
            [
                name,
                arch["model"],
                arch.get("stem", "-"),
                _mixer_cell(arch),
                *([arch["head_mixer"]] if task.name == "detection" else []),
                f"{r0['params']:,}",
                f"{r0['mflops']:.1f}",
                str(estimate([r["score"] for r in runs])),
                ", ".join(f"{r['seed']}: {r['score']:.2f}" for r in runs),
                *(_percent(sum(r["results"][k] for r in runs) / len(runs)) for k in others),
                f"{sorted(r['images_per_s'] for r in runs)[len(runs) // 2]:.0f}",  # the median
            ]
        )
    return ["", "## Every variant", "", *_table(columns, rows)]


def sweep_lines(rows, cfg: Config) -> list[str]:
    keys, label = list(cfg.sweep.space), cfg.data.task.label
    columns = (
        "trial",
        *keys,
        "seed",
        "MFLOPs",
        "params",
        f"{label} (last epoch)",
        f"best epoch's {label}",
        "epochs",
        "node",
    )
    cells = []
    for r in rows:
        epochs = f"{r['epochs']}{' (stopped)' if r['stopped_early'] else ''}"
        cells.append(
            [
                f"`{r['trial_id']}`",
                *(str(r.get(k, "")) for k in keys),
                str(r["seed"]),
                f"{r['mflops']:.1f}",
                f"{r['params']:,}",
                f"{r['score']:.2f}",
                f"{r['best_epoch_score']:.2f}",
                epochs,
                str(r["node_ip"]),
            ]
        )
    swept = ", ".join(f"`{k}`" for k in keys)
    about = (
        f"Ray Tune sweep `{cfg.sweep.name}` over {swept} from variant `{cfg.sweep.base}`, each point once per seed "
        f"({len(rows)} trials, {cfg.sweep.scheduler.type.upper()} scheduler). Trials that ran every epoch are pooled "
        "into the tables above with the variants of the same architecture; trials an ASHA scheduler stopped early are "
        f"listed here only ({label} at the epoch they stopped at)."
    )
    return ["", "## Sweep trials", "", about, "", "![sweep](sweep_accuracy_vs_flops.png)", "", *_table(columns, cells)]


def markdown(cfg: Config, variants, configs: list[Configuration], sweep_rows, tables: Tables) -> str:
    comparisons, task = tables.comparisons(), cfg.data.task
    resolved = sum(v.resolved for v in comparisons)
    about = (
        f"Dataset `{cfg.data.source}` at {cfg.data.resolution} px, {cfg.train.epochs} epochs, seeds {cfg.train.seeds}; "
        f"runs read from MLflow (`{redact(tracking_uri(cfg))}`, experiment `{cfg.mlflow.experiment}`), "
        f"{len(configs)} configurations from {sum(len(c.runs) for c in configs)} runs. FLOPs = 2 x multiply-adds per "
        "image at the training resolution. Top-1 and mAP (COCO's, over IoU 0.50:0.95) are the last epoch's. "
        "Each cell: mean ± half-width of the 95% "
        "t-interval over seeds (n runs). A difference from a baseline is *resolved* when its test gives p < 0.05: a "
        "paired t-test over the seeds both share, else Welch's t-test; each row is one test, not corrected for the "
        f"several a table makes. Here: {resolved} of {len(comparisons)} comparisons resolved, "
        f"{len(comparisons) - resolved} within noise."
    )
    lines = [
        "# Results",
        "",
        about,
        "",
        f"![{task.label} vs FLOPs]({PLOTS[task.name]})",
        *tables_markdown(tables),
        *variants_lines(variants, task),
        *sweep_lines(sweep_rows, cfg),
    ]
    return "\n".join(lines) + "\n"


# the plot of each task's configurations, score against FLOPs
PLOTS = {"classification": "accuracy_vs_flops.png", "detection": "detection_map_vs_flops.png"}


def csv_rows(configs: list[Configuration]) -> list[dict]:
    """One row per configuration; its score in ``top1`` (classifiers) or ``map`` (detectors)."""
    rows = []
    for c in configs:
        e, score = c.estimate(), "map" if c.is_detector else "top1"
        rows.append(
            {
                "configuration": c.label(),
                "kind": c.kind,
                "model": c.arch["model"],
                "stem": c.arch.get("stem", ""),
                "attention_groups": " ".join(map(str, c.arch.get("attention_groups", ()))),
                "mixer": c.arch.get("mixer", ""),
                "kernel_size": c.arch.get("kernel_size", ""),
                "pos_enc": c.arch.get("pos_enc", ""),
                "head_mixer": c.arch.get("head_mixer", ""),
                "params": c.params,
                "mflops": round(c.mflops, 3),
                **{k: "" for k in ("top1", "top1_ci95", "map", "map_ci95")},
                score: round(e.mean, 3),
                f"{score}_ci95": round(e.half_width, 3),
                "n": e.n,
                "run_ids": " ".join(r["run_id"] for r in c.runs.values()),
            }
        )
    return rows


def metrics_summary(cfg: Config, variants: dict[str, list[dict]], configs: list[Configuration]) -> dict:
    """``metrics.json``, what ``dvc exp show`` / ``dvc metrics diff`` compare: each current variant,
    and each configuration of the current sweep (``NAME kernel_size=5``), as the task's score in %
    (``top1`` or ``map``: mean), its 95% interval half-width, n seeds and MFLOPs."""
    score = cfg.data.task.score

    def entry(values: list[float], mflops: float) -> dict:
        e = estimate(values)
        interval = (
            None if math.isnan(e.half_width) else round(e.half_width, 3)
        )  # one seed: no interval (JSON has no NaN)
        return {score: round(e.mean, 3), f"{score}_ci95": interval, "n": e.n, "mflops": round(mflops, 3)}

    summary = {name: entry([r["score"] for r in runs], runs[0]["mflops"]) for name, runs in variants.items()}
    for c in configs:
        for sweep, values in c.trials:
            if sweep == cfg.sweep.name:
                summary[f"{sweep} {values}"] = entry(list(c.scores().values()), c.mflops)  # DVC reads [..] as an index
    return summary
