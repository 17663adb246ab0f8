"""Every bad input through the real stage entry points: exit code 2, a message that names the key
(or file) and what is allowed, and not a single file written or changed."""

import importlib
import shutil

import pytest
import torch

from tests.helpers import run_module, write_params

UNREACHABLE = {"mlflow": {"tracking_uri": "http://127.0.0.1:9"}}  # the discard port: connection refused

CASES = [
    # (stage, params overrides | raw YAML text, what stderr must contain)
    ("prepare", "train: {epochs: [1, 2\n", "not valid YAML"),
    ("train", {"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key; remove it or check its spelling"),
    ("sweep", {"models": {"common": {"kernal_size": 3}}}, "models.common.kernal_size: unknown key"),
    ("train", {"train": {"batch_size": "big"}}, "train.batch_size: Input should be a valid integer"),
    (
        "train",
        {"models": {"variants": {"conv": {"form": "full_attention", "kernel_size": 4}}}},
        "models.variants.conv: kernel_size must be odd",
    ),
    (
        "train",
        {"models": {"variants": {"conv": {"form": "full_attention", "kernel_size": 0}}}},
        "kernel_size must be a positive integer, got 0",
    ),
    (
        "train",
        {"models": {"variants": {"conv": {"form": "full_attention", "heads": 3}}}},
        "models.variants.conv: out_channels",
    ),
    (
        "train",
        {"models": {"common": {"model": "resnet27"}}},
        "models.variants.conv: model='resnet27' is not supported; data.source='mnist5k' feeds classification "
        "models: cvt13 | cvt21 | resnet26 | resnet38 | resnet50 | timm:NAME",
    ),
    ("train", {"models": {"variants": {"conv": {"form": "hybrid"}}}}, "models.variants.conv: form='hybrid'"),
    ("train", {"models": {"variants": {"conv": {"stem": "patchify"}}}}, "models.variants.conv: stem"),
    (
        "prepare",
        {"data": {"source": "imagenet"}},
        "data.source: Input should be 'mnist5k', 'imagefolder', 'cifar10', 'digit_canvases' or 'coco'",
    ),
    ("sweep", {"sweep": {"space": {}}}, "sweep.space: Value error, define at least one key to sweep"),
    ("train", {"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than 0"),
    ("train", {"train": {"epochs": 0}}, "train.epochs: Input should be greater than 0"),
    ("train", {"train": {"lr": 0}}, "train.lr: Input should be greater than 0"),
    (
        "train",
        {"models": {"common": {"small_input": False}}},
        "data.resolution=28 does not fit models.variants.conv: it needs at least",
    ),
    (
        "prepare",
        {"data": {"source": "imagefolder", "path": "no/such/folder"}},
        "data.path='no/such/folder': no such folder",
    ),
    ("train", {"train": {"batch_size": 5000}}, "train.batch_size=5000 exceeds the 4000 training images"),
    ("train", UNREACHABLE, "mlflow.tracking_uri=http://127.0.0.1:9: no MLflow server answered within 3 s"),
    ("sweep", UNREACHABLE, "no MLflow server answered"),
    ("report", UNREACHABLE, "no MLflow server answered"),
    ("train", {"mlflow": {"tracking_uri": "sqlite:///no/such/folder/mlflow.db"}}, "does not exist or is not writable"),
    pytest.param(
        "train",
        {"train": {"accelerator": "gpu"}},
        "train.accelerator='gpu' but this machine has no CUDA GPU",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
]


def _tree(folder):
    """Every file and folder but the stages' logs (logs/STAGE.log keeps each attempt, failed ones too)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.relative_to(folder).parts[0] != "logs"
    }


def _run_main(stage, argv, capsys):
    main = importlib.import_module(f"pipeline.{stage}").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("stage,params,needle", CASES)
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(workdir, capsys, stage, params, needle):
    if isinstance(params, str):
        (workdir / "params.yaml").write_text(params)
    else:
        write_params(workdir, params)
    before = _tree(workdir)
    code, err = _run_main(stage, ["--variant", "conv"] if stage == "train" else [], capsys)
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err
    assert _tree(workdir) == before
    log = workdir / "logs" / f"{'train@conv' if stage == 'train' else stage}.log"
    assert needle in log.read_text()  # the error is in the stage's log too


def test_unknown_variant_and_missing_prepared_data(workdir, capsys):
    before = _tree(workdir)
    code, err = _run_main("train", ["--variant", "nope"], capsys)
    assert code == 2 and "--variant 'nope' is not in models.variants; defined: conv" in err and _tree(workdir) == before
    shutil.rmtree(workdir / "data")
    for stage, argv in (("train", ["--variant", "conv"]), ("sweep", [])):
        code, err = _run_main(stage, argv, capsys)
        assert code == 2 and "data/prepared/meta.json is missing: run the prepare stage first" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["logs", "params.yaml"]


@pytest.mark.parametrize(
    "stage,record,content",
    [
        ("train", "checkpoints/conv/seed-0/run.json", "{not json"),
        ("sweep", "sweep/state.json", '{"fingerprint": "f", "run_id": "r"}'),  # no Tune experiment
    ],
)
def test_a_damaged_resume_record_exits_1_naming_the_file_and_the_fix(workdir, capsys, stage, record, content):
    """Found before any training or Ray runtime starts."""
    path = workdir / record
    path.parent.mkdir(parents=True)
    path.write_text(content)
    code, err = _run_main(stage, ["--variant", "conv"] if stage == "train" else [], capsys)
    assert code == 1 and f"{record} is damaged" in err and "delete it to start this stage afresh" in err, err
    assert "Traceback" not in err and path.read_text() == content


@pytest.mark.slow
def test_a_trial_no_node_can_hold_is_refused_before_it_starts(workdir, capsys):
    write_params(workdir, {"sweep": {"resources": {"gpu": 1 + torch.cuda.device_count()}}})
    before = _tree(workdir)
    code, err = _run_main("sweep", [], capsys)
    assert code == 2 and "sweep.resources.gpu=" in err and "but the largest node has" in err
    assert _tree(workdir) == before


@pytest.mark.slow
def test_the_process_exit_code_is_2(workdir):
    """The same path as above, as a user's shell sees it."""
    write_params(workdir, UNREACHABLE)
    proc = run_module("pipeline.train", "--variant", "conv", cwd=workdir)
    assert proc.returncode == 2 and "no MLflow server answered" in proc.stderr and "Traceback" not in proc.stderr
