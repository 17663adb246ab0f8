"""Layer benchmark: every attention mixer, each with its fast and its reference kernel
(``sasa_fast``, ``sasa_reference``, ``halo_fast``, ...), against a 3x3 convolution of the same width.
``sdpa_core`` is a floor for the global mixers (bot, aa): PyTorch's own fused attention
(``F.scaled_dot_product_attention``) over all pixels with the mixers' 8 heads, without their
projections or relative logits.

Forward + backward: median time over repeats, the activation memory autograd keeps for the
backward pass, and the peak memory of the step (GPU: allocator peak; CPU: growth of the
process's peak resident memory). Each case runs in a fresh process, and every figure is also a
ratio to the convolution measured in the same run.
"""

from __future__ import annotations

import argparse

from benchmarks.common import in_fresh_process, measure_steps, median, positive_int, saved_bytes
from sasa.layers import MIXER_INFO


def _mixer_cases() -> dict[str, tuple[str, str | None]]:
    """Case name -> (mixer, impl): ``NAME_fast`` and ``NAME_reference`` for a mixer with both,
    ``NAME`` for one with a single implementation; the conv is the baseline, ``conv3x3``."""
    cases = {}
    for name, info in MIXER_INFO.items():
        if name != "conv":
            cases.update({f"{name}_{impl}": (name, impl) for impl in info.impls} or {name: (name, None)})
    return cases


MIXER_CASES = _mixer_cases()
LAYERS = ("conv3x3", *MIXER_CASES, "sdpa_core")
DEFAULT_SHAPES = [(8, 128, 28, 28), (8, 64, 56, 56), (8, 256, 14, 14)]  # ResNet groups 2, 1, 3 at 224 px / 2


def _build(layer, channels, kernel_size):
    """``kernel_size`` is the window of the local mixers (each mixer's registered benchmark options
    fit theirs to it, e.g. halo's 8 x 8 blocks with halo k // 2); bot and aa attend globally."""
    from sasa.layers import create_mixer

    if layer == "conv3x3":
        return create_mixer("conv", channels, channels)
    if layer == "sdpa_core":
        from benchmarks.sdpa_core import SDPACore

        return SDPACore(heads=8)
    mixer, impl = MIXER_CASES[layer]
    shared = {"kernel_size": kernel_size, "heads": 8} | ({"impl": impl} if impl else {})
    return create_mixer(mixer, channels, channels, shared=shared, **MIXER_INFO[mixer].bench_options(kernel_size))


def _measure(layer, shape, kernel_size, repeats, warmup, device, dtype):
    """Runs in a fresh process: times (ms), saved activation bytes and peak memory of one step."""
    import torch

    torch.manual_seed(0)
    B, C, H, W = shape
    dtype = getattr(torch, dtype)
    module = _build(layer, C, kernel_size).to(device)
    x = torch.randn(B, C, H, W, device=device, requires_grad=True)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    with autocast:
        saved = saved_bytes(module, x)

    def step():
        with autocast:
            out = module(x)
        out.float().sum().backward()
        x.grad = None
        module.zero_grad(set_to_none=True)

    r = measure_steps(step, device, repeats, warmup)
    if not r.get("oom"):
        r["times_ms"] = [1e3 * t for t in r.pop("times_s")]
    return {**r, "saved_bytes": saved, "threads": torch.get_num_threads()}


def run(shapes, kernel_sizes, repeats, warmup, layers=LAYERS, device="cpu", dtype="float32", progress=None):
    rows = []
    for shape in shapes:
        for k in kernel_sizes:
            per_layer = {}
            for layer in layers:
                if progress:
                    print(f"  {layer:<15} {'x'.join(map(str, shape))} k={k} ...", file=progress, flush=True)
                per_layer[layer] = in_fresh_process(_measure, layer, shape, k, repeats, warmup, device, dtype)
            base = per_layer.get("conv3x3")
            for layer, r in per_layer.items():
                row = {"layer": layer, "shape": list(shape), "kernel_size": k, "device": device, "dtype": dtype, **r}
                if not r.get("oom"):
                    row["median_ms"] = median(r["times_ms"])
                if base and not base.get("oom") and not r.get("oom"):
                    row["time_vs_conv"] = row["median_ms"] / median(base["times_ms"])
                    row["saved_vs_conv"] = r["saved_bytes"] / base["saved_bytes"]
                    row["peak_vs_conv"] = r["peak_bytes"] / max(base["peak_bytes"], 1)
                rows.append(row)
    return rows


def markdown(rows):
    lines = [
        "| layer | B x C x H x W | k | fwd+bwd ms (median) | x conv | saved act. MiB | x conv | peak MiB | x conv |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        time_ms = "out of memory" if r.get("oom") else fmt(r["median_ms"], ".1f")
        lines.append(
            f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['kernel_size']} | {time_ms} | "
            f"{fmt(r.get('time_vs_conv'), '.2f')} | {r['saved_bytes'] / mib:.1f} | "
            f"{fmt(r.get('saved_vs_conv'), '.2f')} | "
            f"{fmt(r.get('peak_bytes') and r['peak_bytes'] / mib, '.1f')} | {fmt(r.get('peak_vs_conv'), '.2f')} |"
        )
    return "\n".join(lines)


def shape(text):
    try:
        dims = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"shape must be BxCxHxW with positive sizes, e.g. 8x128x28x28; got {text!r}")
    return dims


def odd_kernel(text):
    value = positive_int(text)
    if value % 2 == 0:
        raise argparse.ArgumentTypeError(f"attention windows are odd (a centre pixel), got {text!r}")
    return value


def add_arguments(parser):
    parser.add_argument(
        "--shapes",
        type=shape,
        nargs="+",
        default=DEFAULT_SHAPES,
        help="BxCxHxW (default: 8x128x28x28 8x64x56x56 8x256x14x14)",
    )
    parser.add_argument("--kernel-sizes", type=odd_kernel, nargs="+", default=[3, 7, 11])
    parser.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS))


def run_from_args(args, progress=None):
    return run(
        args.shapes, args.kernel_sizes, args.repeats, args.warmup, args.layers, args.device, args.dtype, progress
    )
