"""The report's plots: top-1 (or a detector's mAP) against cost with the Pareto front, and the sweep's points.
matplotlib is imported when a plot is drawn, so the tables need none of it."""

from __future__ import annotations

import io
import math
import zlib
from collections import defaultdict

from pipeline.report.tables import Configuration
from pipeline.stats import Estimate, estimate
from sasa.layers.mixers import MIXER_INFO

# A configuration's kind (``Configuration.kind``) is a SASA form ("other": SASA in groups no form
# has), a model family beyond the ResNets, or another attention mixer, marked as its registry says.
FORM_MARKERS = {"conv": "o", "conv_stem_attention": "s", "full_attention": "^", "other": "D"}
FAMILY_MARKERS = {"ViT": "*", "MaxViT": "p", "CoAtNet": "8", "LeViT": "d", "MViTv2": ">", "CvT": "$C$", "ST-MoE": "$M$"}
FALLBACK_MARKERS = ("1", "2", "3", "4", "+", "x")  # any other kind (a timm family without its own): none unmarked
STEM_MARKERS = {"conv": "o", "attention": "^", "attention_plain": "v", "attention_conv_values": "s"}


def marker(kind: str) -> str:
    """The plot marker of a configuration's kind; an unknown kind gets one by a hash of its name, so
    it is the same in every report."""
    kind = kind.split(" + ")[0]  # a detector's: its backbone's
    if kind in FORM_MARKERS:
        return FORM_MARKERS[kind]
    if kind in FAMILY_MARKERS:
        return FAMILY_MARKERS[kind]
    if kind in MIXER_INFO:
        return MIXER_INFO[kind].marker
    return FALLBACK_MARKERS[zlib.crc32(kind.encode()) % len(FALLBACK_MARKERS)]


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


def plot(configs: list[Configuration], x_of, x_label, label_points, y_label="val top-1") -> bytes:
    """Mean score (top-1 or mAP) with its 95% interval against cost, one marker per kind (a detector's
    backbone form, its heads' mixer by colour), Pareto front of the means."""
    plt, fig, ax = _figure()
    if not configs:
        ax.text(0.5, 0.5, "no runs of this task", ha="center", va="center", transform=ax.transAxes)
    for kind in sorted({c.kind for c in configs}):
        pts = [c for c in configs if c.kind == kind]
        ests = [c.estimate() for c in pts]
        ax.errorbar(
            [x_of(c) for c in pts],
            [e.mean for e in ests],
            yerr=[_error(e) for e in ests],
            marker=marker(kind),
            linestyle="none",
            markersize=7,
            capsize=3,
            label=kind.replace("_", " "),
        )
    front = pareto_front([(x_of(c), c.estimate().mean) for c in configs])
    ax.step(
        [p[0] for p in front],
        [p[1] for p in front],
        where="post",
        color="0.5",
        linestyle="--",
        linewidth=1,
        label="Pareto front (means)",
    )
    if label_points:
        for c in configs:
            ax.annotate(c.label(), (x_of(c), c.estimate().mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.margins(x=0.12)  # room for the labels of the rightmost points
    ns = sorted({c.estimate().n for c in configs})
    ax.set_title(f"mean and 95% interval over seeds (n = {', '.join(map(str, ns))})", fontsize=9)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{y_label} at the last epoch (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return _png(plt, fig)


def plot_sweep(rows, y_label="val top-1") -> bytes:
    """The sweep's configurations (trials pooled over seeds): colour = spatial extent k, marker = stem."""
    plt, fig, ax = _figure()
    pooled = defaultdict(list)
    for r in rows:
        pooled[(r["kernel_size"], r["stem"], r["mflops"])].append(r["score"])
    ks = sorted({r["kernel_size"] for r in rows}, key=lambda k: (k is None, k or 0))
    colours = dict(zip(ks, plt.cm.viridis([0.85 * i / max(1, len(ks) - 1) for i in range(len(ks))])))  # no pale yellow
    for (k, stem, mflops), values in pooled.items():
        e = estimate(values)
        ax.errorbar(
            [mflops],
            [e.mean],
            yerr=[_error(e)],
            color=colours[k],
            fmt=STEM_MARKERS.get(stem, "D"),
            markersize=7,
            capsize=3,
        )
    for k in ks:
        ax.scatter(
            [], [], color=colours[k], marker="s", label=f"k = {k}" if k is not None else "no window (not a ResNet)"
        )
    for stem in sorted({r["stem"] for r in rows if r["stem"] is not None}):
        ax.scatter([], [], color="0.4", marker=STEM_MARKERS.get(stem, "D"), label=f"{stem} stem")
    ax.set_xlabel("FLOPs per image (M)")
    ax.set_ylabel(f"{y_label} at the last epoch (%)")
    ax.set_title("sweep trials: mean and 95% interval over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # outside: never hides a point
    return _png(plt, fig)


def plot_budget(section) -> bytes:
    """Each attention form's gap to conv (paired by seed, 95% interval) against training epochs, from the
    report's training-budget section (None: no runs at two or more lengths)."""
    plt, fig, ax = _figure()
    if section is None:
        ax.text(0.5, 0.5, "no runs at two or more training lengths", ha="center", va="center", transform=ax.transAxes)
        return _png(plt, fig)
    lines = defaultdict(list)  # (depth, form) -> [(epochs, comparison)]
    for row in section.blocks[0].rows:
        if row.comparison is not None:
            epochs, depth, form = row.lead
            lines[(depth, form)].append((int(epochs), row.comparison))
    for (depth, form), points in sorted(lines.items()):
        points.sort(key=lambda p: p[0])
        ax.errorbar(
            [e for e, _ in points],
            [c.difference for e, c in points],
            yerr=[0.0 if math.isnan(c.half_width) else c.half_width for e, c in points],
            marker=FORM_MARKERS.get(form.replace(" ", "_"), "D"),
            capsize=3,
            label=f"{form}, {depth}",
        )
    ax.axhline(0, color="0.5", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    epochs = sorted({e for points in lines.values() for e, _ in points})
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.minorticks_off()
    ax.set_xlabel("training epochs")
    ax.set_ylabel("top-1 minus the conv form's (points)")
    ax.set_title("gap to conv: mean and 95% interval of the paired difference over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(plt, fig)
