"""What a person at the terminal sees of a stage: its own lines and one progress bar; the libraries'
chatter (Lightning's tips and device lines, deprecation warnings, MLflow's notices, Ray Tune's tables,
the hint that srun is there but unused) only in the stage's log file."""

import logging
import re
import sys
import warnings

import pytest

from pipeline import console
from tests.helpers import run_in_terminal, screen_lines, write_params

CHATTER = [
    "Tip:",  # Lightning's litlogger advert
    "GPU available",
    "LeafSpec",  # a deprecation warning from Lightning's _pytree
    "INFO:",
    "serialization_format",  # MLflow's pickle-format warning
    "srun",  # Lightning's "srun is available but not used"
    "Configuration for experiment",  # Ray Tune's tables
    "Trial status",
    "Total params",  # Lightning's model summary
]


def test_library_logging_warnings_and_prints_go_to_the_stage_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    chatty = logging.getLogger("some_library")
    chatty.addHandler(logging.StreamHandler(sys.stderr))  # as Lightning, MLflow and Ray set themselves up
    chatty.propagate = False
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        path = console.to_log_file("train@conv")
        chatty.warning("a notice from the library")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logging.captureWarnings(False)  # pytest's own capture took warnings over: hand them back, as
            logging.captureWarnings(True)  # a stage outside pytest has them
            warnings.warn("a deprecation", DeprecationWarning, stacklevel=1)
        with console.stdout_to_log():
            print("a table printed by the library")
        console.say("train@conv: the stage's own line")
    finally:
        logging.captureWarnings(False)
        root.handlers[:], root.level = saved
    shown = capsys.readouterr()
    assert shown.out == "train@conv: the stage's own line\n" and shown.err == ""
    log = path.read_text()
    assert path == tmp_path / "logs" / "train@conv.log"
    for line in ("a notice from the library", "a deprecation", "a table printed by the library", "own line"):
        assert line in log


@pytest.mark.slow
def test_train_and_sweep_show_their_lines_and_one_bar_each_and_log_the_rest(workdir, tmp_path):
    write_params(
        workdir,
        {
            "train": {"progress_bar": True, "seeds": [0, 1]},
            "sweep": {"space": {"kernel_size": [3]}, "train": {"epochs": 1}},
        },
    )
    srun = tmp_path / "bin" / "srun"  # on a SLURM machine Lightning hints that srun is there, unused
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    env = {"PATH": f"{srun.parent}:{sys.executable.rsplit('/', 1)[0]}:/usr/bin:/bin"}
    for stage, args, bar in (("train@conv", ["pipeline.train", "--variant", "conv"], "train@conv: 100%"),
                             ("sweep", ["pipeline.sweep"], "sweep: 100%")):  # fmt: skip
        status, output = run_in_terminal(sys.executable, "-m", *args, cwd=workdir, env=env, timeout=600)
        assert status == 0, output[-3000:]
        lines = screen_lines(output)
        for word in CHATTER:
            assert not [line for line in lines if word in line], f"{stage} showed {word!r}:\n" + "\n".join(lines)
        bars = {re.sub(r":\s+\d+%.*", "", line) for line in lines if re.search(r": +\d+%\|", line)}
        assert bars == {stage}, lines  # one bar, the stage's, and it got to the end
        assert any(bar in line for line in lines), lines
        log = (workdir / "logs" / f"{stage}.log").read_text()
        if stage.startswith("train"):
            assert "train@conv seed 1: MLflow run" in output and "conv: top-1 %" in output
            for word in ("Tip:", "GPU available", "srun", "Total params"):
                assert word in log, word
        else:
            assert "sweep: a local Ray runtime" in output and "sweep: 2 trials; best by val_top1" in output
            assert "Configuration for experiment" in log and "Started a local Ray instance" in log
