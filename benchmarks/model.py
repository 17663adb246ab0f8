"""Whole-model training throughput: conv vs conv-stem + attention vs full-attention ResNet.

Images per second of full training steps (forward, backward, SGD update) on random data, median
over repeats, each model in a fresh process, each as a ratio to the first form (the conv
baseline) measured in the same run. A model that runs out of memory is reported as such, which is
how the reference kernel's limit shows (e.g. ``--model resnet50 --impls fast reference --batch-size 64``
on a GPU).
"""

from __future__ import annotations

from benchmarks.common import in_fresh_process, measure_steps, median, positive_int
from sasa.layers.registry import IMPLS
from sasa.models import FORMS

MEMORY_FORMATS = ("contiguous", "channels_last")


def _measure(model_name, form, impl, resolution, batch_size, repeats, warmup, device, dtype, compile, memory_format):
    """Runs in a fresh process: step times (s) and peak memory of one configuration."""
    import torch

    from sasa import create_model

    torch.manual_seed(0)
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = create_model(model_name, form=form, impl=impl, num_classes=10, small_input=resolution <= 64).to(
        device, memory_format=layout
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, resolution, resolution, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch_size,), device=device)
    dtype = getattr(torch, dtype)
    step_fn = torch.compile(model) if compile else model

    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(step_fn(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {**measure_steps(step, device, repeats, warmup), "threads": torch.get_num_threads()}


def run(
    model_name,
    forms,
    impls,
    resolution,
    batch_size,
    repeats,
    warmup,
    device="cpu",
    dtype="float32",
    compile=False,
    progress=None,
    memory_formats=("contiguous",),
):
    rows = []
    for memory_format in memory_formats:
        for impl in impls:
            for form in forms:
                if form == "conv" and impl != impls[0]:
                    continue  # no attention in it: the kernel choice changes nothing
                if progress:
                    print(
                        f"  {model_name} {form:<20} impl={impl} {memory_format} {resolution}px batch {batch_size} ...",
                        file=progress,
                        flush=True,
                    )
                r = in_fresh_process(
                    _measure,
                    model_name,
                    form,
                    impl,
                    resolution,
                    batch_size,
                    repeats,
                    warmup,
                    device,
                    dtype,
                    compile,
                    memory_format,
                )
                row = {
                    "model": model_name,
                    "form": form,
                    "impl": impl,
                    "memory_format": memory_format,
                    "resolution": resolution,
                    "batch_size": batch_size,
                    "device": device,
                    "dtype": dtype,
                    "compile": compile,
                    **r,
                }
                if not r.get("oom"):
                    row["images_per_s"] = batch_size / median(r["times_s"])
                rows.append(row)
    base = next((r for r in rows if "images_per_s" in r), None)
    for r in rows:
        if base and "images_per_s" in r:
            r["throughput_vs_baseline"] = r["images_per_s"] / base["images_per_s"]
            r["baseline"] = f"{base['form']} ({base['impl']}, {base['memory_format']})"
    return rows


def markdown(rows):
    lines = [
        "| model | form | kernel | layout | px | batch | images/s (median) | x baseline | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ips = "out of memory" if r.get("oom") else f"{r['images_per_s']:.1f}"
        ratio = f"{r['throughput_vs_baseline']:.2f}" if "throughput_vs_baseline" in r else "-"
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "-"
        kernel = "-" if r["form"] == "conv" else r["impl"]
        lines.append(
            f"| {r['model']} | {r['form']} | {kernel} | {r['memory_format']} | {r['resolution']} | {r['batch_size']} "
            f"| {ips} | {ratio} | {peak} |"
        )
    return "\n".join(lines)


def add_arguments(parser):
    from sasa.models import list_models
    from sasa.models.registry import RESNET

    parser.add_argument("--model", default="resnet26", choices=list_models(family=RESNET), help="default resnet26")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="the first is the baseline")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=["fast"], help="attention kernels (default fast)")
    parser.add_argument("--resolution", type=positive_int, help="image size (default 32 on CPU, 224 on GPU)")
    parser.add_argument("--batch-size", type=positive_int, help="default 32 on CPU, 64 on GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument(
        "--memory-formats",
        nargs="+",
        choices=MEMORY_FORMATS,
        default=["contiguous"],
        help="weight and activation layouts (train.channels_last); the first is the baseline's",
    )


def run_from_args(args, progress=None):
    gpu = args.device.startswith("cuda")
    resolution = args.resolution or (224 if gpu else 32)
    batch_size = args.batch_size or (64 if gpu else 32)
    return run(
        args.model,
        args.forms,
        args.impls,
        resolution,
        batch_size,
        args.repeats,
        args.warmup,
        args.device,
        args.dtype,
        args.compile,
        progress,
        args.memory_formats,
    )
