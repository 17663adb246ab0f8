"""The run record the train stage and the sweep resume from: local files and fsspec URLs, and a
clear error for a damaged one."""
import json

import fsspec
import pytest

from pipeline.runstate import RunRecord
from pipeline.stage import StageError


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"fingerprint": "abc"}', "\xff\xfe"])
def test_a_damaged_record_is_an_error_naming_the_file_and_the_fix(tmp_path, content):
    path = tmp_path / "run.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(StageError, match=rf"{path} is damaged .*; delete it to start this stage afresh"):
        RunRecord(path).read()


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
