"""Command line: ``python -m sasa info ...`` (one model's counts), ``python -m sasa table``
(the paper's Table 1 beside ours) and ``python -m sasa build-ext`` (compile the C++ CPU kernel now
rather than on first use)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from sasa import count, create_model, list_models
from sasa.layers import MIXERS, STEMS
from sasa.layers.block_attention import BLOCK_ATTENTIONS
from sasa.models import FORMS, is_resnet
from sasa.paper import TABLE1


def _groups(text):
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(g) for g in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated group numbers such as 2,3,4, got {text!r}"
        ) from None


def _option(text):
    """KEY=VALUE, the value read as YAML (so 8 is an int, 0.2 a float, true a bool)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as block_size=8, got {text!r}")
    return key, yaml.safe_load(value)


RESNET_OPTIONS = (
    "form",
    "stem",
    "attention_groups",
    "kernel_size",
    "heads",
    "pos_enc",
    "width",
    "small_input",
    "mixer",
    "mixer_arg",
    "block_attention",
)


def _info(args):
    given = [o for o in RESNET_OPTIONS if getattr(args, o) is not None]
    if is_resnet(args.model):
        if args.model_arg:
            raise ValueError(f"--model-arg is for non-ResNet models; {args.model} takes --form, --stem, ... ")
        kwargs = {o: getattr(args, o) for o in given if o != "mixer_arg"}
        kwargs.setdefault("form", "conv")
        if args.mixer_arg:
            kwargs["mixer_args"] = dict(args.mixer_arg)
    else:
        if given:
            raise ValueError(
                f"{', '.join('--' + o.replace('_', '-') for o in given)}: ResNet options; "
                f"give {args.model}'s as --model-arg KEY=VALUE"
            )
        kwargs = dict(args.model_arg or [])
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, **kwargs)
    counts = count(model, (args.in_chans, args.resolution, args.resolution))
    result = json.loads(
        json.dumps({"model": args.model, **model.config, "resolution": args.resolution, **counts.as_dict()})
    )
    if args.json:
        print(json.dumps(result))
        return
    rows = [(k.replace("_", " "), v) for k, v in result.items() if k not in ("params", "macs", "flops")]
    rows += [
        ("params", f"{counts.params:,} ({counts.params / 1e6:.2f} M)"),
        ("multiply-adds", f"{counts.macs:,} ({counts.macs / 1e9:.2f} G)"),
        ("FLOPs", f"{counts.flops:,} ({counts.flops / 1e9:.2f} G)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if isinstance(value, list):
            value = ",".join(map(str, value)) or "none"
        print(f"{key:<{width}}  {value}")


def _delta(ours, paper):
    return f"{100 * (ours - paper) / paper:+.1f}%"


def _table(args):
    print(f"Table 1 at {args.resolution} px, 1000 classes: ours vs the paper")
    header = (
        f"{'model':<9} {'form':<20} {'params M':>9} {'paper':>6} {'dparams':>8} "
        f"{'GFLOPs':>7} {'paper':>6} {'dFLOPs':>7}"
    )
    print(header)
    print("-" * len(header))
    for (name, form), (gflops, mparams, _) in TABLE1.items():
        c = count(create_model(name, form=form), args.resolution)
        print(
            f"{name:<9} {form:<20} {c.params / 1e6:9.2f} {mparams:6.1f} {_delta(c.params / 1e6, mparams):>8} "
            f"{c.flops / 1e9:7.2f} {gflops:6.1f} {_delta(c.flops / 1e9, gflops):>7}"
        )


def _build_ext(args):
    import time

    from sasa.ops import cpu_extension

    if os.environ.get("SASA_CPU_EXTENSION") == "0":
        print("error: SASA_CPU_EXTENSION=0 turns the C++ CPU kernel off", file=sys.stderr)
        return 1
    start = time.perf_counter()
    if cpu_extension.load() is None:
        print(
            "error: the C++ CPU kernel could not be built (see the warning above); the PyTorch kernel will be used",
            file=sys.stderr,
        )
        return 1
    print(
        f"C++ CPU kernel ready ({time.perf_counter() - start:.0f} s): {' '.join(p.name for p in cpu_extension.SOURCES)}"
    )
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sasa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters, multiply-adds and FLOPs of one model")
    info.add_argument(
        "--model", required=True, help=f"one of {', '.join(list_models())}, or timm:NAME (any timm model)"
    )
    info.add_argument(
        "--model-arg",
        type=_option,
        action="append",
        metavar="KEY=VALUE",
        help="an option of a non-ResNet model, e.g. img_size=32 (repeatable; YAML values: [4, 4] is a list)",
    )
    info.add_argument("--form", help=f"ResNets: one of {', '.join(FORMS)} (default: conv)")
    info.add_argument("--stem", help=f"one of {', '.join(STEMS)} (default: from --form)")
    info.add_argument("--attention-groups", type=_groups, help="e.g. 2,3,4 (default: from --form)")
    info.add_argument("--kernel-size", type=int, help="attention window k (default 7)")
    info.add_argument("--heads", type=int, help="attention heads (default 8)")
    info.add_argument("--pos-enc", help="relative, absolute or none (default relative)")
    info.add_argument("--mixer", help=f"what fills the attention groups: one of {', '.join(MIXERS)} (default sasa)")
    info.add_argument(
        "--mixer-arg",
        type=_option,
        action="append",
        metavar="KEY=VALUE",
        help="an option of the mixer, e.g. block_size=8 (repeatable)",
    )
    info.add_argument(
        "--block-attention", help=f"a module in every block: one of {', '.join(BLOCK_ATTENTIONS)} (default none)"
    )
    info.add_argument("--width", type=float, help="channel multiplier (default 1.0)")
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--in-chans", type=int, default=3)
    info.add_argument("--small-input", action="store_true", default=None, help="stems for 28-32 px images")
    info.add_argument("--resolution", type=int, default=224)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    table = sub.add_parser("table", help="the paper's Table 1 models: our counts beside the paper's")
    table.add_argument("--resolution", type=int, default=224)
    sub.add_parser("build-ext", help="compile (or find cached) the C++ CPU kernels of the attention layers")
    args = parser.parse_args(argv)
    try:
        return {"info": _info, "table": _table, "build-ext": _build_ext}[args.command](args) or 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
