"""What every benchmark shares: fresh processes, medians, timing that waits for the device, output."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path


def in_fresh_process(fn, *args):
    """Run ``fn(*args)`` in a spawned process, so one case's allocator high-water mark and
    compiled caches cannot leak into the next case's numbers."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def measure_steps(step, device, repeats, warmup):
    """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` ones (waiting for queued
    GPU work around each) and the peak memory they add: the allocator's peak on a GPU, the growth
    of the process's peak resident memory on the CPU. ``{"oom": True}`` if the device ran out."""
    import resource

    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    try:
        for _ in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"oom": True}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024  # KiB on Linux
    return {"times_s": times[warmup:], "peak_bytes": peak}


def saved_bytes(fn, *args):
    """Bytes autograd keeps for the backward pass of ``fn(*args)``: its activation memory. Each
    storage counts once, however many saved views of it there are (a layer that saves q and a
    reshaped view of q holds q's bytes once)."""
    import torch

    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def median(values):
    return statistics.median(values)


def machine():
    """The facts a reader needs to compare numbers between runs."""
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write(rows, markdown_table, out: Path, title):
    """JSON (rows + machine) and a markdown summary beside it, each written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine()
    payload = json.dumps({"machine": info, "rows": rows}, indent=2)
    summary = f"# {title}\n\n{', '.join(f'{k} {v}' for k, v in info.items())}\n\n{markdown_table}\n"
    for path, text in ((out, payload), (out.with_suffix(".md"), summary)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(summary)
    print(f"JSON: {out}\nmarkdown: {out.with_suffix('.md')}", file=sys.stderr)
