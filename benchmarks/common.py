"""What every benchmark shares: fresh processes, medians, timing that waits for the device, output."""
from __future__ import annotations

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


def timed(step, device):
    """Seconds one call of ``step`` takes, waiting for queued GPU work before and after."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median(values):
    return statistics.median(values)


def machine():
    """The facts a reader needs to compare numbers between runs."""
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
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
