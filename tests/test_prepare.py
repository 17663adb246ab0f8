"""The prepare stage's three sources, built from real bundled digits or files the test writes."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data import PreparedDataModule
from pipeline.prepare import prepare
from tests.conftest import write_params


def _module(folder, **data):
    cfg = load_config(folder / "params.yaml")
    return PreparedDataModule(cfg.data, batch_size=8, prepared=folder / "data" / "prepared")


def test_mnist5k_split_is_stratified_and_deterministic(prepared_mnist, tmp_path):
    meta = json.loads((prepared_mnist / "meta.json").read_text())
    assert meta["counts"] == {"train": 4000, "val": 1000} and meta["in_chans"] == 1
    train, val = (np.load(prepared_mnist / f"{s}.npz")["labels"] for s in ("train", "val"))
    assert np.array_equal(np.bincount(train, minlength=10), 4 * np.bincount(val, minlength=10))
    write_params(tmp_path)
    again = prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "again")
    assert again == meta
    assert np.array_equal(np.load(tmp_path / "again" / "val.npz")["images"], np.load(prepared_mnist / "val.npz")["images"])


def test_imagefolder_from_written_files(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["cat", "dog", "eel"]
    for split, n in (("train", 4), ("val", 2)):
        for c in classes:
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / split / c / f"{i}.JPEG")
    write_params(tmp_path, {"data": {"source": "imagefolder", "path": str(tmp_path / "imgs"), "resolution": 32, "hflip": True}})
    meta = prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "data" / "prepared")
    assert meta["classes"] == classes and meta["counts"] == {"train": 12, "val": 6}
    dm = _module(tmp_path)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (6, 3, 32, 32) and yv.tolist() == [0, 0, 1, 1, 2, 2]


def test_cifar10_from_written_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (10, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 10))}
        (root / name).write_bytes(pickle.dumps(batch))
    labels = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": labels}))
    write_params(tmp_path, {"data": {"source": "cifar10", "path": str(root), "resolution": 32}})
    meta = prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "data" / "prepared")
    assert meta["counts"] == {"train": 50, "val": 10} and meta["classes"][0] == "airplane" and meta["in_chans"] == 3
    first = pickle.loads((root / "data_batch_1").read_bytes())[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.load(tmp_path / "data" / "prepared" / "train.npz")["images"][0], first)
    dm = _module(tmp_path)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32)
    assert abs(float(x.mean())) < 0.5  # normalised with the split's own statistics


def test_imagefolder_split_without_images_is_a_config_error(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "imgs" / split / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "train" / "cat" / "a.png")
    (tmp_path / "imgs" / "val" / "cat" / "notes.txt").write_text("not an image")
    write_params(tmp_path, {"data": {"source": "imagefolder", "path": str(tmp_path / "imgs")}})
    with pytest.raises(ConfigError, match=r"val: no images"):
        prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["imagefolder", "cifar10"])
def test_missing_dataset_is_a_config_error(tmp_path, source):
    write_params(tmp_path, {"data": {"source": source, "path": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match="data.path"):
        prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
