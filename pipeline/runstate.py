"""The record that ties a stage's resumable state to its MLflow run, shared by the train stage
(``CHECKPOINT_DIR/VARIANT/run.json``) and the sweep (``sweep/state.json``).

A record holds the configuration's fingerprint, the MLflow run id (and whatever else the stage
keeps, such as the sweep's Tune experiment), ``finished`` (with the run's ``result``) once the run is
done, and ``reported`` once the stage has written its outputs. A stage resumes only an *unfinished*
record of the same configuration whose run still exists (``resume_or_start``), and reuses a finished
but unreported one (a seed done before the stage was interrupted): DVC re-runs a finished stage after
a code or data change, and that must start afresh rather than re-report old state. Records may live
on a shared filesystem or behind an fsspec URL (``s3://...``), like the checkpoints beside them.
"""

from __future__ import annotations

import json

from fsspec.core import url_to_fs
from mlflow import MlflowClient

from pipeline.stage import StageError, write_text
from pipeline.tracking import run_in_experiment


class RunRecord:
    def __init__(self, path: str, fields: tuple[str, ...] = ("fingerprint", "run_id")):
        """``fields``: what every record of this stage holds, as strings."""
        self.path, self.fields = str(path), fields

    def read(self) -> dict | None:
        """The record, or None where there is none; a damaged one is an error naming the fix."""
        fs, path = url_to_fs(self.path)
        if not fs.exists(path):
            return None
        try:
            state = json.loads(fs.cat_file(path))
            if not isinstance(state, dict) or not all(isinstance(state.get(k), str) for k in self.fields):
                raise ValueError(f"expected an object with {', '.join(self.fields)} as strings")
            if not isinstance(state.get("result"), (dict, type(None))):
                raise ValueError("its result is not an object")
        except (ValueError, UnicodeDecodeError) as err:
            raise StageError(
                f"{self.path} is damaged ({err}); delete it to start this stage afresh (its MLflow run is kept)"
            ) from None
        return state

    def resumable(self, fingerprint: str, client: MlflowClient, experiment_id: str) -> dict | None:
        """An interrupted attempt of this configuration whose run is still in the experiment, with
        that run set back to RUNNING (it may have been marked KILLED or FAILED); else None."""
        state = self.read()
        if not state or state.get("finished") or state.get("fingerprint") != fingerprint:
            return None
        if not run_in_experiment(client, state["run_id"], experiment_id):
            return None
        client.update_run(state["run_id"], status="RUNNING")
        return state

    def resume_or_start(self, fingerprint: str, client: MlflowClient, experiment_id: str, start) -> tuple[dict, bool]:
        """The resumable state (see ``resumable``) and True; else the state ``start()`` returns (a new
        run's ``run_id`` and what else the stage keeps), recorded with ``fingerprint``, and False."""
        state = self.resumable(fingerprint, client, experiment_id)
        if state:
            return state, True
        state = {"fingerprint": fingerprint, **start()}
        self.write(state)
        return state, False

    def unreported(self, fingerprint: str, client: MlflowClient, experiment_id: str) -> dict | None:
        """The result of a finished run of this configuration that no stage output has reported yet
        (its stage was interrupted later), if that run is still in the experiment; else None."""
        state = self.read()
        if not state or not state.get("finished") or state.get("reported") or state.get("fingerprint") != fingerprint:
            return None
        return state.get("result") if run_in_experiment(client, state["run_id"], experiment_id) else None

    def write(self, state: dict):
        write_text(self.path, json.dumps(state))

    def finish(self, result: dict | None = None):
        self.write({**self.read(), "finished": True, "result": result})

    def mark_reported(self):
        self.write({**self.read(), "reported": True})
