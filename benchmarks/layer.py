"""Layer benchmark: SASA (fast and reference kernels) against a 3x3 convolution of the same width.

Forward + backward, median time over repeats, activation memory autograd keeps for the backward
pass, and the peak resident memory the step adds to its process (each case runs in a fresh
process so one case's allocator high-water mark cannot leak into another's). Every figure is
also given as a ratio to the convolution measured in the same run.

    python -m benchmarks.layer --shapes 8x128x28x28 --kernel-sizes 7 --out benchmarks/results/layer.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

LAYERS = ("conv3x3", "sasa_fast", "sasa_reference")


def _build(layer, channels, kernel_size):
    import torch.nn as nn

    from sasa import SASA2d

    if layer == "conv3x3":
        return nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    return SASA2d(channels, channels, kernel_size, heads=8, impl=layer.removeprefix("sasa_"))


def _measure(layer, shape, kernel_size, repeats, warmup):
    """Runs in a fresh process: returns times (ms), saved activation bytes and peak RSS growth."""
    import torch

    torch.manual_seed(0)
    B, C, H, W = shape
    module = _build(layer, C, kernel_size)
    x = torch.randn(B, C, H, W, requires_grad=True)

    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        module(x).sum().backward()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
        x.grad = None
        module.zero_grad(set_to_none=True)
    peak_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024  # KiB on Linux
    return {"times_ms": times, "saved_bytes": saved, "peak_rss_growth_bytes": peak_growth, "threads": torch.get_num_threads()}


def _in_fresh_process(*args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, args)


def _shape(text):
    try:
        dims = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"shape must be BxCxHxW with positive sizes, e.g. 8x128x28x28; got {text!r}")
    return dims


def run(shapes, kernel_sizes, repeats, warmup, layers=LAYERS, progress=sys.stderr):
    rows = []
    for shape in shapes:
        for k in kernel_sizes:
            per_layer = {}
            for layer in layers:
                print(f"  {layer:<15} {'x'.join(map(str, shape))} k={k} ...", file=progress, flush=True)
                per_layer[layer] = _in_fresh_process(layer, shape, k, repeats, warmup)
            base = per_layer.get("conv3x3")
            for layer, r in per_layer.items():
                row = {"layer": layer, "shape": list(shape), "kernel_size": k, "median_ms": statistics.median(r["times_ms"]), **r}
                if base:
                    row["time_vs_conv"] = row["median_ms"] / statistics.median(base["times_ms"])
                    row["saved_vs_conv"] = r["saved_bytes"] / base["saved_bytes"]
                    row["peak_vs_conv"] = r["peak_rss_growth_bytes"] / max(base["peak_rss_growth_bytes"], 1)
                rows.append(row)
    return rows


def markdown(rows):
    lines = [
        "| layer | B x C x H x W | k | fwd+bwd ms (median) | x conv | saved act. MiB | x conv | peak RSS growth MiB | x conv |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in rows:
        lines.append(
            f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['kernel_size']} | {r['median_ms']:.1f} | "
            f"{r.get('time_vs_conv', float('nan')):.2f} | {r['saved_bytes'] / mib:.1f} | {r.get('saved_vs_conv', float('nan')):.2f} | "
            f"{r['peak_rss_growth_bytes'] / mib:.1f} | {r.get('peak_vs_conv', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[(8, 128, 28, 28)], help="BxCxHxW (default 8x128x28x28)")
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[7])
    parser.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/layer.json"))
    args = parser.parse_args(argv)
    rows = run(args.shapes, args.kernel_sizes, args.repeats, args.warmup, args.layers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(args.out)
    print(markdown(rows))
    print(f"\nJSON: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
