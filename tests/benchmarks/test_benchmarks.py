"""The benchmark CLI runs end to end on tiny shapes and writes what it promises (no timings are
asserted: speed is reported by the benchmarks, not tested)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO


def _bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_layer_benchmark_writes_json_and_markdown(tmp_path):
    out = tmp_path / "layer.json"
    some = [
        "conv3x3",
        "sasa_fast",
        "sasa_reference",
        "halo_fast",
        "bot_reference",
        "sdpa_core",
        "gnconv",
    ]  # every case is in LAYERS: tests/sasa/test_registry.py
    done = _bench(
        "layer",
        "--shapes",
        "2x16x12x12",
        "--kernel-sizes",
        "7",
        "--layers",
        *some,
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = {(r["layer"], r["kernel_size"]): r for r in result["rows"]}
    assert set(rows) == {(layer, 7) for layer in some}
    assert rows["conv3x3", 7]["time_vs_conv"] == 1.0 and len(rows["sasa_fast", 7]["times_ms"]) == 2
    assert all(r["median_ms"] > 0 and r["saved_bytes"] > 0 for r in rows.values())
    # the reference keeps every k x k window for its backward pass, the fast kernel does not
    assert rows["sasa_reference", 7]["saved_bytes"] > 4 * rows["sasa_fast", 7]["saved_bytes"]
    assert result["machine"]["torch"] == torch.__version__
    assert "| sasa_fast | 2x16x12x12 | 7 |" in out.with_suffix(".md").read_text()


def test_sdpa_core_is_global_attention_of_the_map_over_itself():
    from benchmarks.sdpa_core import SDPACore

    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    t = x.view(2, 8, 2, 15)  # (B, heads, d, pixels)
    p = torch.softmax(t.transpose(-1, -2) @ t / 2**0.5, dim=-1)  # (B, heads, queries, keys)
    expected = (t @ p.transpose(-1, -2)).view_as(x)
    assert torch.allclose(SDPACore(heads=8)(x), expected)


@pytest.mark.slow
def test_model_benchmark_reports_throughput_against_the_conv_baseline(tmp_path):
    out = tmp_path / "model.json"
    done = _bench(
        "model",
        "--forms",
        "conv",
        "full_attention",
        "--resolution",
        "16",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--memory-formats",
        "contiguous",
        "channels_last",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["form"], r["memory_format"]) for r in rows] == [
        ("conv", "contiguous"),
        ("full_attention", "contiguous"),
        ("conv", "channels_last"),
        ("full_attention", "channels_last"),
    ]
    assert rows[0]["throughput_vs_baseline"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
    for r in rows[1:]:
        assert r["throughput_vs_baseline"] == pytest.approx(r["images_per_s"] / rows[0]["images_per_s"])
    assert "| resnet26 | full_attention | fast | channels_last | 16 | 2 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["layer", "--shapes", "8x128"], "shape must be BxCxHxW"),
        (["model", "--forms", "conv", "resnet"], "invalid choice: 'resnet'"),
        (["layer", "--repeats", "0"], "must be a positive whole number, got '0'"),
        (["layer", "--kernel-sizes", "4"], "attention windows are odd"),
        (["model", "--model", "resnet51"], "invalid choice: 'resnet51'"),
        (["model", "--batch-size", "-2"], "must be a positive whole number"),
        (["model", "--forms", "conv", "--resolution", "4", "--batch-size", "2"], "is too small for this network"),
    ],
)
def test_bad_arguments_exit_2_naming_them(args, message, tmp_path):
    done = _bench(*args, "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_device_without_gpu_is_refused(tmp_path):
    done = _bench("model", "--device", "cuda", "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "no CUDA device" in done.stderr
