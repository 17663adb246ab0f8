"""One CLI for the benchmarks: ``python -m benchmarks layer|model [options]``.

Each writes JSON (rows + machine) and a markdown summary under ``benchmarks/results/`` and prints
the summary. Every figure is a median over repeats, and every ratio is against a baseline
measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import layer, model
from benchmarks.common import positive_int, write

BENCHMARKS = {
    "layer": (layer, "SASA and the other attention mixers vs a 3x3 convolution, forward + backward"),
    "model": (model, "ResNet training throughput: conv vs attention forms"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (module, title) in BENCHMARKS.items():
        p = sub.add_parser(
            name, help=title, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
        p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
        p.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "bfloat16", "float16"),
            help="autocast dtype (default float32: no autocast)",
        )
        p.add_argument("--repeats", type=positive_int, default=5)
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{name}.json"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is visible to torch")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    module, title = BENCHMARKS[args.benchmark]
    try:
        rows = module.run_from_args(args, progress=sys.stderr)
    except ValueError as err:  # sasa's argument checks, e.g. an input too small for the network
        parser.error(str(err))
    write(rows, module.markdown(rows), args.out, f"{title} ({args.device}, {args.dtype})")


if __name__ == "__main__":
    main()
