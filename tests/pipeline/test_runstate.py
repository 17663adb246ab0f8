"""The run record the train stage and the sweep resume from: local files and fsspec URLs, a clear error
for a damaged one, and the one resume-or-start decision both stages make with it."""

import json

import fsspec
import pytest
from mlflow import MlflowClient

from pipeline.runstate import RunRecord
from pipeline.stage import StageError

SWEEP_FIELDS = ("fingerprint", "run_id", "experiment")


@pytest.mark.parametrize(
    "content,fields",
    [
        ("{not json", None),
        ("[1, 2]", None),
        ('{"fingerprint": "abc"}', None),
        ("\xff\xfe", None),
        ('{"fingerprint": "f", "run_id": 7}', None),
        ('{"fingerprint": "f", "run_id": "r", "finished": true, "result": [0.9]}', None),
        ('{"fingerprint": "f", "run_id": "r"}', SWEEP_FIELDS),  # a sweep's record without its Tune experiment
    ],
)
def test_a_damaged_record_is_an_error_naming_the_file_and_the_fix(tmp_path, content, fields):
    path = tmp_path / "run.json"
    path.write_bytes(content.encode("latin-1"))
    record = RunRecord(path) if fields is None else RunRecord(path, fields=fields)
    with pytest.raises(StageError, match=rf"{path} is damaged .*; delete it to start this stage afresh"):
        record.read()


def test_records_round_trip_on_a_local_folder_and_behind_a_url(tmp_path):
    for where in (str(tmp_path / "ck" / "run.json"), "memory://bucket/ck/run.json"):
        record = RunRecord(where)
        assert record.read() is None
        fsspec.core.url_to_fs(where)[0].makedirs(where.rsplit("/", 1)[0], exist_ok=True)
        record.write({"fingerprint": "f", "run_id": "r"})
        record.finish({"top1": 0.9})
        assert record.read() == {"fingerprint": "f", "run_id": "r", "finished": True, "result": {"top1": 0.9}}
        record.mark_reported()
        assert record.read()["reported"] is True
    assert json.loads((tmp_path / "ck" / "run.json").read_text())["finished"] is True
    assert not list((tmp_path / "ck").glob(".*tmp"))  # written by rename, nothing left beside it


def test_resume_or_start_resumes_only_an_unfinished_run_of_the_same_configuration(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("test")
    record = RunRecord(tmp_path / "state.json", fields=SWEEP_FIELDS)
    started = []

    def start():
        run_id = client.create_run(exp_id).info.run_id
        started.append(run_id)
        return {"run_id": run_id, "experiment": f"t-{run_id[:8]}"}

    first, resumed = record.resume_or_start("f1", client, exp_id, start)
    assert not resumed and first == {"fingerprint": "f1", "run_id": started[0], "experiment": f"t-{started[0][:8]}"}
    assert record.read() == first
    client.set_terminated(first["run_id"], "KILLED")  # the stage was interrupted
    again, resumed = record.resume_or_start("f1", client, exp_id, start)
    assert resumed and again == first and len(started) == 1
    assert client.get_run(first["run_id"]).info.status == "RUNNING"
    changed, resumed = record.resume_or_start("f2", client, exp_id, start)  # the configuration changed
    assert not resumed and changed["run_id"] == started[1] != first["run_id"]
    record.finish()
    _, resumed = record.resume_or_start("f2", client, exp_id, start)  # a finished run is never continued
    assert not resumed and len(started) == 3
