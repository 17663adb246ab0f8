"""``python -m pipeline.preset configs/NAME.yaml``: make a ready preset the project's ``params.yaml``.

A preset is a whole params file, or an overlay naming the preset it changes (``extends:
imagenet.yaml``): its sections are merged into that one's, key by key, except that
``models.variants``, ``sweep.space`` and ``sweep.train`` are replaced whole (an overlay lists its
own). The result is validated like any ``params.yaml`` before it is written, so DVC tracks every
value as a stage parameter and ``dvc exp run`` / ``dvc repro`` run it as usual.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipeline.config import Config, ConfigError, validate
from pipeline.stage import atomic_write_text

REPLACED = {("models", "variants"), ("sweep", "space"), ("sweep", "train")}


def _merge(base: dict, overlay: dict, path: tuple = ()) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        where = (*path, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and where not in REPLACED:
            out[key] = _merge(out[key], value, where)
        else:
            out[key] = value
    return out


def resolve(path: str | Path, _seen: tuple = ()) -> dict:
    """The preset's full params, its ``extends`` chain merged."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such preset")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: extends itself (through {', '.join(str(p) for p in _seen)})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(Config.model_fields)})")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    return _merge(resolve(path.parent / base, (*_seen, path.resolve())), raw)


def apply(preset: str | Path, out: str | Path = "params.yaml") -> Config:
    """Validate the preset's full params (every variant and sweep architecture built) and write them to
    ``out``, every key spelled out."""
    params = resolve(preset)
    cfg = validate(params, f"{preset} (with what it extends)")
    text = f"# Written by `python -m pipeline.preset {preset}`; edit it, or apply another preset.\n"
    text += yaml.safe_dump(cfg.params_file(), sort_keys=False)
    atomic_write_text(out, text)
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", help="a file under configs/, e.g. configs/table3.yaml")
    parser.add_argument("--out", default="params.yaml", help="the params file to write (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = apply(args.preset, args.out)
    except ConfigError as err:
        print(f"error: {err}; {args.out} is unchanged", file=sys.stderr)
        sys.exit(2)
    print(
        f"{args.out}: {args.preset}: {len(cfg.models.variants)} variants x {len(cfg.train.seeds)} seeds, "
        f"sweep {cfg.sweep.name!r} over {', '.join(cfg.sweep.space)}. Run it with `dvc exp run` (or `dvc repro`)."
    )


if __name__ == "__main__":
    main()
