"""``python -m sasa`` as a user runs it."""

import json
import os
import re
import subprocess
import sys

import pytest

import sasa


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sasa", *args], capture_output=True, text=True, timeout=300)


def test_info_json_has_the_counts_of_the_model():
    proc = _run(
        "info", "--model", "resnet26", "--form", "full_attention", "--kernel-size", "5", "--resolution", "96", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    expected = sasa.count(sasa.create_model("resnet26", form="full_attention", kernel_size=5), 96)
    assert (result["params"], result["macs"], result["flops"]) == (expected.params, expected.macs, expected.flops)
    assert result["stem"] == "attention" and result["attention_groups"] == [1, 2, 3, 4]


def test_info_table_is_readable():
    proc = _run("info", "--model", "resnet50", "--attention-groups", "3,4", "--form", "conv_stem_attention")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^attention groups +3,4$", proc.stdout, re.M) and re.search(
        r"^FLOPs +[\d,]+ \([\d.]+ G\)$", proc.stdout, re.M
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "resnet50", "--kernel-size", "4"], "kernel_size"),
        (["--model", "vgg16"], "model='vgg16'"),
        (["--model", "resnet50", "--form", "attention"], "form='attention'"),
        (["--model", "resnet50", "--attention-groups", "1,7"], "attention_groups"),
        (["--model", "resnet50", "--resolution", "16"], "too small"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, needle):
    proc = _run("info", *args)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_build_ext_reports_the_cpp_kernel_and_honours_the_off_switch():
    proc = _run("build-ext")
    assert proc.returncode == 0 and "C++ CPU kernel ready" in proc.stdout, proc.stderr
    env = {**os.environ, "SASA_CPU_EXTENSION": "0"}
    off = subprocess.run(
        [sys.executable, "-m", "sasa", "build-ext"], capture_output=True, text=True, timeout=300, env=env
    )
    assert off.returncode == 1 and "SASA_CPU_EXTENSION=0" in off.stderr
