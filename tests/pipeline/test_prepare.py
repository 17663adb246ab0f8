"""The prepare stage's three sources, built from real bundled digits or files the test writes,
and its checks of every file: bad ones are all reported, then fail the stage or are skipped."""

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data import PreparedDataModule
from pipeline.prepare import main, prepare
from tests.helpers import write_params

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


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
    assert np.array_equal(
        np.load(tmp_path / "again" / "val.npz")["images"], np.load(prepared_mnist / "val.npz")["images"]
    )


def test_imagefolder_from_written_files(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["cat", "dog", "eel"]
    for split, n in (("train", 4), ("val", 2)):
        for c in classes:
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / c / f"{i}.JPEG"
                )
    write_params(
        tmp_path, {"data": {"source": "imagefolder", "path": str(tmp_path / "imgs"), "resolution": 32, "hflip": True}}
    )
    meta = prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "data" / "prepared")
    assert meta["classes"] == classes and meta["counts"] == {"train": 12, "val": 6}
    dm = _module(tmp_path)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (6, 3, 32, 32) and yv.tolist() == [0, 0, 1, 1, 2, 2]


def _write_cifar(tmp_path, on_bad_file="fail"):
    """Six batches of 10 images and the meta file; test_batch is written as the official files are
    (protocol 2, ``numpy.core``), the others as Python 3 and numpy 2 write them."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in CIFAR_BATCHES:
        batch = {b"data": rng.integers(0, 255, (10, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, 10).tolist()}
        if name == "test_batch":
            (root / name).write_bytes(
                pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            )
        else:
            (root / name).write_bytes(pickle.dumps(batch))
    labels = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": labels}))
    write_params(
        tmp_path, {"data": {"source": "cifar10", "path": str(root), "resolution": 32, "on_bad_file": on_bad_file}}
    )
    return root


def test_cifar10_from_written_batches(tmp_path):
    root = _write_cifar(tmp_path)
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


def _image_bytes(fmt, rng):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _half(data):
    return data[: len(data) // 2]


def _bad_imagefolder(tmp_path, on_bad_file):
    """Classes cat, dog, eel with good images, and one of each kind of bad entry; returns the bad paths."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "dog", "eel"):
            (root / split / c).mkdir(parents=True)
            for i in range(n if (split, c) != ("val", "eel") else 0):
                (root / split / c / f"{i}.JPEG").write_bytes(_image_bytes("JPEG", rng))
    (root / "val" / "fox").mkdir()
    (root / "val" / "fox" / "0.JPEG").write_bytes(_image_bytes("JPEG", rng))
    bad = {
        root / "train" / "cat" / "cut.jpg": _half(_image_bytes("JPEG", rng)),
        root / "val" / "dog" / "cut.png": _half(_image_bytes("PNG", rng)),
        root / "train" / "dog" / "zero.png": b"",
        root / "val" / "cat" / "notes.jpg": b"not an image",
    }
    for path, data in bad.items():
        path.write_bytes(data)
    write_params(
        tmp_path, {"data": {"source": "imagefolder", "path": str(root), "resolution": 32, "on_bad_file": on_bad_file}}
    )
    return [*bad, root / "val" / "eel", root / "val" / "fox"]


def test_imagefolder_bad_files_fail_the_stage_and_are_all_listed(tmp_path, capsys):
    bad = _bad_imagefolder(tmp_path, "fail")
    with pytest.raises(ConfigError, match=r"6 bad file\(s\) in data.path, listed above; .*set data.on_bad_file: skip"):
        prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "out")
    err = capsys.readouterr().err
    for path in bad:
        assert f"{path}: " in err
    assert (
        f"{bad[0]}: cannot decode: image file is truncated" in err
        and f"{bad[1]}: cannot decode: image file is truncated" in err
    )
    assert f"{bad[2]}: zero bytes" in err and f"{bad[4]}: empty class folder" in err
    assert f"{bad[5]}: class 'fox' is not among train/'s classes" in err
    assert not (tmp_path / "out").exists()


def test_prepare_entry_point_exits_2_on_bad_files_and_writes_nothing(tmp_path, capsys, monkeypatch):
    bad = _bad_imagefolder(tmp_path, "fail")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["--params", str(tmp_path / "params.yaml")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert all(str(path) in err for path in bad) and "error: 6 bad file(s)" in err
    assert not (tmp_path / "data" / "prepared").exists()


def test_imagefolder_bad_files_are_skipped_and_training_reads_the_rest(tmp_path, capsys):
    bad = _bad_imagefolder(tmp_path, "skip")
    out = tmp_path / "data" / "prepared"
    meta = prepare(load_config(tmp_path / "params.yaml"), out=out)
    assert (
        meta["counts"] == {"train": 9, "val": 4} and meta["skipped"] == 6 and meta["classes"] == ["cat", "dog", "eel"]
    )
    assert f"skipped 6 bad file(s) (listed in {out / 'bad_files.json'})" in capsys.readouterr().err
    listed = json.loads((out / "bad_files.json").read_text())
    assert sorted(row["path"] for row in listed) == sorted(map(str, bad)) and all(row["reason"] for row in listed)
    indexed = {path for split in ("train", "val") for path, _ in json.loads((out / f"{split}.json").read_text())}
    assert len(indexed) == 13 and not indexed & {str(p.relative_to(tmp_path / "imgs")) for p in bad}
    dm = _module(tmp_path)
    dm.setup()
    assert sum(len(y) for _, y in dm.val_dataloader()) == 4 and sum(len(y) for _, y in dm.train_dataloader()) == 8
    for dataset in (dm.train_set, dm.val_set):  # every indexed file, not only those a shuffled epoch draws
        assert all(dataset[i][0].shape == (3, 32, 32) for i in range(len(dataset)))


def _break_cifar(root):
    """One batch of the wrong shape, one cut short, one with a label outside the 10 classes."""
    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((10, 1000), np.uint8), b"labels": [0] * 10}))
    (root / "data_batch_3").write_bytes(_half((root / "data_batch_3").read_bytes()))
    batch = pickle.loads((root / "data_batch_4").read_bytes())
    batch[b"labels"][7] = 12
    (root / "data_batch_4").write_bytes(pickle.dumps(batch))
    return [root / "data_batch_2", root / "data_batch_3", root / "data_batch_4"]


def test_cifar10_bad_batches_fail_the_stage_and_are_all_listed(tmp_path, capsys):
    bad = _break_cifar(_write_cifar(tmp_path, "fail"))
    with pytest.raises(ConfigError, match=r"3 bad file\(s\)"):
        prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "out")
    err = capsys.readouterr().err
    assert f"{bad[0]}: data is uint8 of shape (10, 1000); expected uint8 pixels of shape (N, 3072)" in err
    assert f"{bad[1]}: cannot unpickle: pickle data was truncated" in err
    assert f"{bad[2]}: 1 rows with labels outside 0..9" in err
    assert not (tmp_path / "out").exists()


def test_cifar10_bad_batches_and_rows_are_skipped(tmp_path):
    root = _write_cifar(tmp_path, "skip")
    bad = _break_cifar(root)
    out = tmp_path / "data" / "prepared"
    meta = prepare(load_config(tmp_path / "params.yaml"), out=out)
    assert meta["counts"] == {"train": 29, "val": 10} and meta["skipped"] == 3
    assert [row["path"] for row in json.loads((out / "bad_files.json").read_text())] == list(map(str, bad))
    train = np.load(out / "train.npz")
    kept = pickle.loads((root / "data_batch_4").read_bytes())[b"data"][[i for i in range(10) if i != 7]]
    assert np.array_equal(train["images"][10:19], kept.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert train["labels"].max() <= 9


def _record(path):
    open(path, "w").close()


class _Hostile:
    """Unpickles to a call of ``_record``: what a malicious batch could do with any function."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _record, (str(self.marker),)


def test_cifar10_batch_that_would_run_code_is_rejected_unexecuted(tmp_path, capsys):
    root = _write_cifar(tmp_path, "skip")
    marker = tmp_path / "ran"
    payload = pickle.dumps({b"data": _Hostile(marker), b"labels": [0] * 10})
    (root / "data_batch_1").write_bytes(payload)
    meta = prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "out")
    assert meta["skipped"] == 1 and meta["counts"]["train"] == 40
    assert f"global {_record.__module__}._record is not allowed" in capsys.readouterr().err
    assert not marker.exists()
    pickle.loads(payload)  # the plain unpickler runs it: the check above is not vacuous
    assert marker.exists()


def test_many_bad_files_are_summarised_and_all_written_outside_the_output(tmp_path, capsys):
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "cat" / "good.png")
    for i in range(25):
        (root / "train" / "cat" / f"{i:02}.png").write_bytes(b"")
    write_params(tmp_path, {"data": {"source": "imagefolder", "path": str(root)}})
    with pytest.raises(
        ConfigError, match=r"25 bad file\(s\) in data.path, listed above \(all of them in (.+)\)"
    ) as error:
        prepare(load_config(tmp_path / "params.yaml"), out=tmp_path / "out")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 5 more"
    full = Path(str(error.value).split("all of them in ")[1].split(")")[0])
    try:
        assert len(json.loads(full.read_text())) == 25
    finally:
        full.unlink()
    assert not (tmp_path / "out").exists()
