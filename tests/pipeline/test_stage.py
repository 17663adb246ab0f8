"""What every stage shares: SIGTERM ends a stage like Ctrl-C, and outputs appear whole or not at all."""

import signal
import threading
import time

import pytest

from pipeline.stage import atomic_dir, atomic_write_text, run_stage
from tests.helpers import write_params


def test_sigterm_takes_the_ctrl_c_path_and_exits_130(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the stage writes its log
    write_params(tmp_path)
    cleaned = []

    def body(cfg, args):
        try:
            # to the main thread: a signal to the process may land on a thread an earlier in-process test
            # left running, and leave the main thread's sleep uninterrupted
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            time.sleep(10)
        finally:
            cleaned.append(True)  # finally blocks run: temporary outputs are removed

    before = signal.getsignal(signal.SIGTERM)
    # Python's own Ctrl-C handler, as in a fresh stage process (not whatever an earlier in-process test left)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_stage("test", body, "test", argv=["--params", str(tmp_path / "params.yaml")])
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert exit_info.value.code == 130 and cleaned == [True]
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_interrupted_write_keeps_the_previous_output_and_no_temporary_files(tmp_path):
    target = tmp_path / "prepared"
    with atomic_dir(target) as tmp:
        (tmp / "meta.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "meta.json").write_text("half")
        raise KeyboardInterrupt
    assert (target / "meta.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_leftovers_of_a_killed_attempt_are_removed_by_the_next(tmp_path):
    target = tmp_path / "reports"
    (tmp_path / ".reports.abc123").mkdir()  # what a SIGKILL between mkdtemp and rename leaves
    (tmp_path / ".reports.abc123" / "results.md").write_text("half")
    (tmp_path / ".reports.def456.old").mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "results.md").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]
    assert (target / "results.md").read_text() == "new"
    atomic_write_text(tmp_path / "metrics" / "conv.json", "{}")
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["conv.json"]


@pytest.mark.parametrize(
    "text,why",
    [
        ('{"format": "array", "coun', "corrupt \\(Unterminated"),
        ("[1, 2]", "corrupt \\(it lacks format"),
        ('{"format": "array"}', "corrupt \\(it lacks counts"),
    ],
)
def test_a_corrupt_meta_json_names_the_file_and_the_fix(tmp_path, text, why):
    """Cut short by a full disk or edited by hand: the stages say which file and what to do."""
    from pipeline import preflight
    from pipeline.stage import StageError

    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(StageError, match=f"{tmp_path / 'meta.json'} is {why}.*run dvc repro -f prepare"):
        preflight.prepared_data(tmp_path, batch_size=8, task="classification")
