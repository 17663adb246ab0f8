"""Stage ``report``: read the variants' runs back from MLflow and write ``reports/``.

- ``accuracy_vs_flops.png`` / ``accuracy_vs_params.png``: top-1 against cost, one marker per
  form (SASA) or attention mixer (halo, bot, ...), the Pareto front drawn, points labelled;
- ``results.md``: a table in the shape of the paper's Table 1, the paper's ImageNet numbers
  beside ours for the same model names, then every variant;
- ``results.csv``: the same rows for ``dvc plots``;
- ``sweep_accuracy_vs_flops.png`` and a table in the shape of the paper's Table 4, from the sweep
  stage's ``sweep/results.csv``: top-1 against FLOPs coloured by spatial extent, marked by stem.
Only finished runs whose configuration fingerprint matches the current ``params.yaml`` count,
so a stale run of an older configuration never shows up as a result.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mlflow import MlflowClient

from pipeline import preflight
from pipeline.config import Config
from pipeline.stage import StageError, atomic_dir, csv_text, run_stage
from pipeline.tracking import tracking_uri
from sasa.models import FORMS
from sasa.paper import TABLE1, TABLE4

REPORTS = Path("reports")
SWEEP_RESULTS = Path("sweep/results.csv")
# one marker per form with SASA, and per other attention mixer (a variant's "kind")
MARKERS = {"conv": "o", "conv_stem_attention": "s", "full_attention": "^", "halo": "P", "bot": "X", "neighborhood": "v",
           "aa": "<", "san_pairwise": "h", "san_patchwise": "H"}
STEM_MARKERS = {"conv": "o", "attention": "^", "attention_plain": "v", "attention_conv_values": "s"}
DEPTH_NAMES = {"resnet26": "ResNet-26", "resnet38": "ResNet-38", "resnet50": "ResNet-50"}


def load_runs(cfg: Config) -> list[dict]:
    """The latest finished MLflow run of every variant in ``models.variants``, as flat rows."""
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        raise StageError(f"no MLflow experiment {cfg.mlflow.experiment!r} at {tracking_uri(cfg)}: run the train stage first")
    rows, missing = [], []
    for variant in cfg.models.variants:
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=(
                f"tags.`sasa.kind` = 'train' and tags.`sasa.variant` = '{variant}' "
                f"and tags.`sasa.fingerprint` = '{cfg.fingerprint(variant)}' and attributes.status = 'FINISHED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            missing.append(variant)
            continue
        run, arch = runs[0], cfg.models.resolved(variant)
        m = run.data.metrics
        groups = FORMS[arch.form_name]["attention_groups"] if arch.attention_groups is None else arch.attention_groups
        rows.append({
            "variant": variant, "model": arch.model_name, "form": arch.form_name,
            "mixer": arch.mixer_name if groups else "none", "attention_groups": " ".join(map(str, groups)),
            "kind": arch.mixer_name if groups and arch.mixer_name != "sasa" else arch.form_name,
            # exactly one of Table 1's forms
            "paper_form": arch.stem is None and arch.attention_groups is None and arch.mixer_name == "sasa",
            "params": int(m["params"]), "mflops": m["flops"] / 1e6, "top1": 100 * m["top1"], "top5": 100 * m["top5"],
            "images_per_s": m.get("throughput_images_per_s", float("nan")), "run_id": run.info.run_id,
        })
    if missing:
        raise StageError(f"no finished MLflow run with the current configuration for: {', '.join(missing)} (run dvc repro)")
    return rows


def load_sweep(path: Path = SWEEP_RESULTS) -> list[dict]:
    if not path.is_file():
        raise StageError(f"{path} is missing: run the sweep stage first (dvc repro sweep)")
    rows = list(csv.DictReader(path.open()))
    if not rows:
        raise StageError(f"{path} has no trials")
    for r in rows:
        r.update(kernel_size=int(r["kernel_size"]), params=int(r["params"]), mflops=float(r["mflops"]),
                 top1=float(r["top1"]), epochs=int(r["epochs"]), stopped_early=r["stopped_early"] == "True")
    return rows


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


def plot(rows, x_key, x_label, label_points):
    plt, fig, ax = _figure()
    for kind in sorted({r["kind"] for r in rows}):
        pts = [r for r in rows if r["kind"] == kind]
        ax.scatter([r[x_key] for r in pts], [r["top1"] for r in pts], marker=MARKERS.get(kind, "D"), s=60, label=kind.replace("_", " "))
    front = pareto_front([(r[x_key], r["top1"]) for r in rows])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.5", linestyle="--", linewidth=1, label="Pareto front")
    if label_points:
        for r in rows:
            ax.annotate(r["variant"], (r[x_key], r["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(plt, fig)


def plot_sweep(rows) -> bytes:
    """Top-1 vs FLOPs of every trial: colour = spatial extent k, marker = stem."""
    plt, fig, ax = _figure()
    ks = sorted({r["kernel_size"] for r in rows})
    colours = dict(zip(ks, plt.cm.viridis([0.85 * i / max(1, len(ks) - 1) for i in range(len(ks))])))  # no pale yellow
    for r in rows:
        ax.scatter(r["mflops"], r["top1"], color=colours[r["kernel_size"]], marker=STEM_MARKERS.get(r["stem"], "D"), s=60)
    for k in ks:
        ax.scatter([], [], color=colours[k], marker="s", label=f"k = {k}")
    for stem in sorted({r["stem"] for r in rows}):
        ax.scatter([], [], color="0.4", marker=STEM_MARKERS.get(stem, "D"), label=f"{stem} stem")
    ax.set_xlabel("FLOPs per image (M)")
    ax.set_ylabel("val top-1 at the last epoch (%)")
    ax.set_title("sweep: spatial extent and stem", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # outside: never hides a point
    return _png(plt, fig)


def sweep_markdown(rows, cfg: Config) -> list[str]:
    """The paper's Table 4 shape: one row per k, a column per stem (best trial of each cell)."""
    stems = sorted({r["stem"] for r in rows}, key=lambda s: (s != "conv", s))
    best = {}
    for r in rows:
        cell = (r["kernel_size"], r["stem"])
        if cell not in best or r["top1"] > best[cell]["top1"]:
            best[cell] = r
    lines = [
        "",
        "## Sweep: spatial extent and stem (the shape of the paper's Table 4)",
        "",
        f"Ray Tune sweep `{cfg.sweep.name}` over {', '.join(f'`{k}`' for k in cfg.sweep.space)} from variant "
        f"`{cfg.sweep.base}` ({len(rows)} trials, {cfg.sweep.scheduler.type.upper()} scheduler; top-1 at each trial's last "
        "epoch, the one ASHA stopped it at for stopped trials). "
        "Each cell: MFLOPs / M params / top-1 (%). *Paper*: ResNet-50, conv stem, ImageNet (GFLOPs / M params / top-1).",
        "",
        "![sweep](sweep_accuracy_vs_flops.png)",
        "",
        "| k | " + " | ".join(f"{s} stem" for s in stems) + " | paper |",
        "|---|" + "---|" * (len(stems) + 1),
    ]
    for k in sorted({r["kernel_size"] for r in rows}):
        cells = [
            f"{best[k, s]['mflops']:.1f} / {best[k, s]['params'] / 1e6:.3f} / {best[k, s]['top1']:.1f}" if (k, s) in best else "-"
            for s in stems
        ]
        paper = "{:.1f} / {:.1f} / {:.1f}".format(*TABLE4[k]) if k in TABLE4 else "-"
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {paper} |")
    keys = list(cfg.sweep.space)
    lines += [
        "",
        "| trial | " + " | ".join(keys) + " | MFLOPs | params | best top-1 % | epochs | node |",
        "|---|" + "---|" * (len(keys) + 5),
    ]
    for r in rows:
        lines.append(
            f"| `{r['trial_id']}` | " + " | ".join(str(r.get(k, "")) for k in keys)
            + f" | {r['mflops']:.1f} | {r['params']:,} | {r['top1']:.2f} | {r['epochs']}{' (stopped)' if r['stopped_early'] else ''} | {r['node_ip']} |"
        )
    return lines


def _mixer_cell(row) -> str:
    """``halo (3, 4)``: what fills the bottlenecks' 3x3 position, and in which groups."""
    return "-" if row["mixer"] == "none" else f"{row['mixer']} ({row['attention_groups'].replace(' ', ', ')})"


def markdown(rows, cfg: Config, sweep_rows) -> str:
    depths = [d for d in DEPTH_NAMES if any(r["model"] == d and r["paper_form"] for r in rows)]
    lines = [
        "# Results",
        "",
        f"Dataset `{cfg.data.source}` at {cfg.data.resolution} px; runs read from MLflow (`{tracking_uri(cfg)}`, "
        f"experiment `{cfg.mlflow.experiment}`). FLOPs = 2 x multiply-adds per image at the training resolution.",
        "",
        "![top-1 vs FLOPs](accuracy_vs_flops.png)",
        "",
        "## In the shape of the paper's Table 1",
        "",
        "Each cell: FLOPs / params / top-1. *Paper*: ImageNet, 224 px, full-width models (GFLOPs, M params). "
        "*Ours*: this run's variants of the same model name and form (MFLOPs, M params); hybrids and "
        "other stems are in the table below.",
        "",
        "| form | | " + " | ".join(DEPTH_NAMES[d] for d in depths) + " |",
        "|---|---|" + "---|" * len(depths),
    ]
    for form in dict.fromkeys(f for _, f in TABLE1):
        ours = [r for r in rows if r["form"] == form and r["paper_form"]]
        if not ours:
            continue
        for r in ours:  # one row per variant, so two variants of one model and form both show
            cells = [f"{r['mflops']:.1f} M / {r['params'] / 1e6:.2f} M / {r['top1']:.1f}" if r["model"] == d else "-" for d in depths]
            lines.append(f"| {form.replace('_', ' ')} | ours: {r['variant']} | " + " | ".join(cells) + " |")
        paper = ["{:.1f} G / {:.1f} M / {:.1f}".format(*TABLE1[(d, form)]) for d in depths]
        lines.append("| | paper | " + " | ".join(paper) + " |")
    lines += [
        "",
        "## All variants",
        "",
        "| variant | model | form | mixer (groups) | params | MFLOPs | top-1 % | top-5 % | train images/s | MLflow run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["mflops"]):
        lines.append(
            f"| {r['variant']} | {r['model']} | {r['form']} | {_mixer_cell(r)} | {r['params']:,} | {r['mflops']:.1f} | {r['top1']:.2f} | "
            f"{r['top5']:.2f} | {r['images_per_s']:.0f} | `{r['run_id']}` |"
        )
    lines += sweep_markdown(sweep_rows, cfg)
    return "\n".join(lines) + "\n"


def report(cfg: Config, out: Path = REPORTS):
    preflight.tracking(cfg)
    rows, sweep_rows = load_runs(cfg), load_sweep()
    with atomic_dir(out) as tmp:
        (tmp / "accuracy_vs_flops.png").write_bytes(plot(rows, "mflops", "FLOPs per image (M)", cfg.report.label_points))
        (tmp / "accuracy_vs_params.png").write_bytes(
            plot([{**r, "mparams": r["params"] / 1e6} for r in rows], "mparams", "parameters (M)", cfg.report.label_points)
        )
        (tmp / "sweep_accuracy_vs_flops.png").write_bytes(plot_sweep(sweep_rows))
        (tmp / "results.md").write_text(markdown(rows, cfg, sweep_rows))
        (tmp / "results.csv").write_text(csv_text(rows))
    print(json.dumps({r["variant"]: round(r["top1"], 2) for r in rows}))
    print(f"wrote {out}/results.md, results.csv and the plots accuracy_vs_flops, accuracy_vs_params, sweep_accuracy_vs_flops")


def main(argv=None):
    run_stage(__doc__.splitlines()[0], lambda cfg, args: report(cfg), argv=argv)


if __name__ == "__main__":
    main()
