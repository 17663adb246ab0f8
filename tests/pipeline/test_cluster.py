"""Cluster paths as a cluster runs them: nodes started by the real launchers (torchrun, Lightning's
own launcher, srun's environment, ``ray start``, ``mlflow server``) on 127.0.0.1, each training
node in its own copy of the project folder, so nothing is shared by accident. Every process a test
starts has a deadline and is killed, with all its children, when the test ends."""

import contextlib
import csv
import json
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request

import mlflow
import mlflow.pytorch
import psutil
import pytest
import torch

from tests.helpers import REPO, stage_log, write_params
from tests.processes import BIN, finish, free_port, wait_for

TRAIN = ["-m", "pipeline.train", "--variant", "conv"]
EPOCHS = 3


def node_folders(tmp_path, prepared_mnist, count, train):
    """One copy of the project's run folder per node: params.yaml and data/prepared (as DVC's prepare
    stage would leave on each node), no shared disk."""
    folders = []
    for rank in range(count):
        folder = tmp_path / f"node{rank}"
        shutil.copytree(prepared_mnist, folder / "data" / "prepared")
        write_params(
            folder,
            {
                "train": {
                    "epochs": EPOCHS,
                    "limit_train_batches": 10,
                    "limit_val_batches": 2,
                    "accelerator": "cpu",
                    **train,
                }
            },
        )
        folders.append(folder)
    return folders


def mlflow_runs(folder):
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["test"], output_format="list")


def torchrun_nodes(launched, folders, port):
    """The README's recipe, ``scripts/cluster/torchrun_train.sh``, on every node."""
    env = {
        "NNODES": str(len(folders)),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "VARIANT": "conv",
        "PYTHON_BIN": str(BIN),
    }
    procs = []
    for rank, folder in enumerate(folders):
        shutil.copytree(REPO / "scripts", folder / "scripts", dirs_exist_ok=True)
        procs.append(
            launched.start(
                [folder / "scripts" / "cluster" / "torchrun_train.sh"], cwd=folder, env={**env, "NODE_RANK": str(rank)}
            )
        )
    return procs


@pytest.mark.slow
def test_torchrun_nodes_with_their_own_checkpoint_folders_stop_at_once_naming_it(tmp_path, prepared_mnist, launched):
    folders = node_folders(tmp_path, prepared_mnist, 2, {"num_nodes": 2, "strategy": "ddp"})
    started = time.time()
    outputs = [finish(p, timeout=180) for p in torchrun_nodes(launched, folders, free_port())]
    elapsed = time.time() - started
    for proc, out in zip(launched.procs, outputs):
        assert proc.returncode != 0, out[-3000:]
        assert "train.checkpoint_dir: checkpoints/conv/seed-0 is not shared: rank 1 on" in out, out[-3000:]
    assert elapsed < 120, f"took {elapsed:.0f} s to fail"
    assert not mlflow_runs(folders[0]), "an MLflow run was created for a run that cannot train"
    assert not (folders[1] / "mlflow.db").exists(), "rank 1 touched the tracking store"


@pytest.mark.slow
def test_torchrun_nodes_sharing_a_checkpoint_folder_stop_together_and_resume_together(
    tmp_path, prepared_mnist, launched
):
    """Both nodes' torchrun get SIGTERM half a second apart (as a scheduler's stop reaches a job's
    nodes), pass it on to their ranks, and every rank stops at the same step; re-run, both resume
    from the same checkpoint into the same MLflow run."""
    shared = tmp_path / "shared-checkpoints"
    folders = node_folders(
        tmp_path, prepared_mnist, 2, {"num_nodes": 2, "strategy": "ddp", "checkpoint_dir": str(shared)}
    )
    nodes = torchrun_nodes(launched, folders, free_port())
    wait_for(lambda: (shared / "conv" / "seed-0" / "last.ckpt").exists(), nodes, timeout=300, what="first checkpoint")
    for proc in nodes:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    outputs = [finish(p, timeout=60) for p in nodes]
    for out in outputs:  # each node's rank took the clean path, none died in a broken collective
        assert "interrupted: nothing half-written was kept" in out, out[-3000:]
    (killed,) = mlflow_runs(folders[0])
    assert killed.info.status == "KILLED"

    again = torchrun_nodes(launched, folders, free_port())
    outputs = [finish(p, timeout=300) for p in again]
    for rank, (proc, out) in enumerate(zip(again, outputs)):
        assert proc.returncode == 0, out[-3000:]
        assert (
            f"rank {rank} of 2, MLflow run {killed.info.run_id}: resuming from {shared}/conv/seed-0/last.ckpt" in out
        ), out[-3000:]
    (run,) = mlflow_runs(folders[0])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_top1")]
    assert len(steps) == len(set(steps)) == EPOCHS, steps  # both ranks went on from the same epoch
    assert json.loads((folders[0] / "metrics" / "conv.json").read_text())["seeds"]["0"]["run_id"] == run.info.run_id
    assert not (folders[1] / "mlflow.db").exists() and not (folders[1] / "metrics").exists()


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_once_and_the_rerun_resumes(tmp_path, prepared_mnist, launched):
    """Lightning's own launcher (devices: 2): the signal reaches rank 1 only."""
    (folder,) = node_folders(tmp_path, prepared_mnist, 1, {"devices": 2, "strategy": "ddp"})
    main = launched.start([sys.executable, *TRAIN], cwd=folder)
    last = folder / "checkpoints" / "conv" / "seed-0" / "last.ckpt"
    wait_for(lambda: last.exists(), [main], timeout=300, what="first checkpoint")
    (rank1,) = [p for p in psutil.Process(main.pid).children() if "pipeline.train" in " ".join(p.cmdline())]
    rank1.send_signal(signal.SIGTERM)
    signalled = time.time()
    out = finish(main, timeout=60)
    rank1.wait(timeout=30)
    assert time.time() - signalled < 30
    assert main.returncode == 130 and "interrupted" in out, out[-3000:]
    (killed,) = mlflow_runs(folder)
    assert killed.info.status == "KILLED"

    again = launched.start([sys.executable, *TRAIN], cwd=folder)
    out = finish(again, timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert f"rank 1 of 2, MLflow run {killed.info.run_id}: resuming from checkpoints/conv/seed-0/last.ckpt" in out
    (run,) = mlflow_runs(folder)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"


@pytest.mark.slow
def test_srun_tasks_never_restore_a_stale_requeue_checkpoint(tmp_path, prepared_mnist, launched):
    """Two tasks with the environment ``srun --ntasks 2`` gives them (no SLURM daemon here): Lightning's
    SLURM environment places them; an ``hpc_ckpt`` an older job left behind is not restored."""
    (folder,) = node_folders(tmp_path, prepared_mnist, 1, {"devices": 2, "strategy": "ddp", "epochs": 1})
    stale = folder / "checkpoints" / "conv" / "seed-0"
    stale.mkdir(parents=True)
    (stale / "hpc_ckpt_1.ckpt").write_bytes(b"a requeue checkpoint of an older attempt")
    (folder / "hpc_ckpt_1.ckpt").write_bytes(b"and one in the project folder")
    port = free_port()
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_NODEID": "0",
        "MASTER_PORT": str(port),
    }
    tasks = [
        launched.start(
            [sys.executable, *TRAIN], cwd=folder, env={**slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}
        )
        for r in range(2)
    ]
    outputs = [finish(p, timeout=300) for p in tasks]
    log = stage_log(folder, "train@conv")  # both tasks' Lightning lines
    assert "MEMBER: 2/2" in log and "hpc_ckpt" not in log and "Restoring states" not in log
    for rank, (proc, out) in enumerate(zip(tasks, outputs)):
        assert proc.returncode == 0, out[-3000:]
        assert f"rank {rank} of 2" in out and "starting afresh" in out
        assert "hpc_ckpt" not in out and "Restoring states" not in out
    assert not (stale / "hpc_ckpt_1.ckpt").exists()  # rank 0 cleared the folder of the older attempt
    (run,) = mlflow_runs(folder)
    assert run.info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# Ray: a cluster of two `ray start` nodes and an `mlflow server`, the sweep and a train stage run by DVC


@pytest.fixture
def mlflow_server(tmp_path, launched):
    port = free_port()
    server = launched.start(
        [
            BIN / "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--workers",
            1,
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            tmp_path / "server-artifacts",
        ],
        cwd=tmp_path,
    )
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    wait_for(healthy, [server], timeout=120, what="MLflow server")
    return uri


def stop_ray_nodes(*temp_dirs: str):
    """Stop exactly the Ray nodes started with these temp dirs (each of their processes names its
    node's session folder in its command line). `ray stop` would kill every Ray process on the machine,
    a sweep running beside the suite included."""
    nodes = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(folder in part for folder in temp_dirs for part in p.info["cmdline"] or [])
    ]
    for p in nodes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(nodes, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=30)


@pytest.fixture
def ray_cluster(tmp_path, launched):
    """A head and a worker node with token authentication, each with its own temp dir (short: Ray's
    sockets live there) and working folder. Yields the environment a driver needs; ``ray stop`` ends
    both nodes."""
    port, head_dir, worker_dir = (
        free_port(),
        tempfile.mkdtemp(prefix="rh", dir="/tmp"),
        tempfile.mkdtemp(prefix="rw", dir="/tmp"),
    )
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    common = ["--num-cpus", 1, "--disable-usage-stats"]
    (tmp_path / "worker-node").mkdir()
    try:
        head = launched.start(
            [
                BIN / "ray",
                "start",
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                port,
                "--temp-dir",
                head_dir,
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                free_port(),
                *common,
            ],
            cwd=tmp_path,
            env=auth,
        )
        assert head.wait(timeout=120) == 0, head.communicate()[0][-3000:]
        worker = launched.start(
            [
                BIN / "ray",
                "start",
                "--address",
                f"127.0.0.1:{port}",
                "--node-ip-address",
                "127.0.0.1",
                "--temp-dir",
                worker_dir,
                *common,
            ],
            cwd=tmp_path / "worker-node",
            env=auth,
        )
        assert worker.wait(timeout=120) == 0, worker.communicate()[0][-3000:]
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", **auth}
    finally:  # also when a node failed to start: the head's daemons outlive `ray start`
        stop_ray_nodes(head_dir, worker_dir)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


@pytest.mark.slow
def test_sweep_and_train_on_a_ray_cli_cluster_tracked_by_an_mlflow_server(
    dvc_project, ray_cluster, mlflow_server, launched
):
    env = {**ray_cluster, "MLFLOW_TRACKING_URI": mlflow_server}
    sweep = {
        "name": "t",
        "base": "attn",
        "space": {"kernel_size": [3, 5], "stem": ["conv"]},
        "train": {"epochs": 2},
        "scheduler": {"type": "fifo"},
    }
    write_params(
        dvc_project,
        {"models": {"variants": {"conv": {"form": "conv"}, "attn": {"form": "conv_stem_attention"}}}, "sweep": sweep},
    )
    launched.start(["dvc", "repro", "prepare"], cwd=dvc_project).wait(timeout=300)

    relative = launched.start([sys.executable, "-m", "pipeline.sweep"], cwd=dvc_project, env=env)
    out = finish(relative, timeout=180)
    assert (
        relative.returncode == 2 and "sweep.storage_path='sweep/ray' is a folder of the head node's project" in out
    ), out[-3000:]

    storage = dvc_project.parent / "shared-sweeps"  # one machine: every node sees this folder
    write_params(
        dvc_project,
        {
            "models": {"variants": {"conv": {"form": "conv"}, "attn": {"form": "conv_stem_attention"}}},
            "sweep": {**sweep, "storage_path": str(storage)},
        },
    )
    repro = launched.start(["dvc", "repro", "sweep"], cwd=dvc_project, env=env)
    out = finish(repro, timeout=600)
    assert repro.returncode == 0, out[-5000:]
    assert "2 node(s)" in out
    rows = list(csv.DictReader((dvc_project / "sweep" / "results.csv").open()))
    assert len(rows) == 2 and len({r["node_id"] for r in rows}) == 2, "both trials ran on one node"
    k3, k5 = sorted(rows, key=lambda r: int(r["kernel_size"]))
    assert float(k5["mflops"]) > float(k3["mflops"]) > 0  # a larger window costs more; params barely change
    assert 0 <= int(k5["params"]) - int(k3["params"]) < 0.01 * int(k3["params"])

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sasa.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sasa.kind") == "sweep_trial"]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert parent.data.params["sweep/base"] == "attn" and {c.info.run_id for c in children} == {
        r["mlflow_run_id"] for r in rows
    }
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        assert (
            child.data.metrics["flops"] > 0
            and "val_top1" in child.data.metrics
            and child.data.params["train/epochs"] == "2"
        )
    assert not (dvc_project / "mlflow.db").exists(), "runs went to a local store instead of the server"

    train = launched.start(["dvc", "repro", "train@conv"], cwd=dvc_project, env=env)
    out = finish(train, timeout=600)
    assert train.returncode == 0, out[-5000:]
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`sasa.kind` = 'train'")
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
    # the trained model, served back by the tracking server, predicts as the run's network does
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    (spec,) = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model").signature.inputs.to_dict()
    with torch.no_grad():
        logits = model(torch.randn(2, *spec["tensor-spec"]["shape"][1:]))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
