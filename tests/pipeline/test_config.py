"""params.yaml is validated once, up front, with errors that name the key path."""

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from tests.helpers import REPO, leaves, stage_params, within, write_params


def test_the_projects_params_yaml_is_valid():
    cfg = load_config(REPO / "params.yaml")
    assert {cfg.models.resolved(v).form_name for v in cfg.models.variants} == {
        "conv",
        "conv_stem_attention",
        "full_attention",
    }
    # repeated runs, and trials that pool with the variants: the same recipe, every trial to the end
    assert len(cfg.train.seeds) >= 3 and cfg.recipe(cfg.trial_train()) == cfg.recipe(cfg.train)
    assert cfg.sweep.scheduler.type == "fifo"
    assert cfg.mlflow.tracking_uri.startswith("sqlite:///")


BAD = [
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"lr": -0.1}}, "train.lr"),
    ({"train": {"seeds": [0, 0]}}, "train.seeds: Value error, each seed once"),
    ({"train": {"seeds": []}}, "train.seeds"),
    ({"sweep": {"space": {"seed": [0, 1]}}}, "'seed' cannot be swept (every trial runs once per train.seeds)"),
    ({"train": {"batch_size": "big"}}, "train.batch_size"),
    ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key"),
    ({"data": {"source": "imagenet"}}, "data.source"),
    (
        {"mlflow": {"tracking_uri": "./mlruns"}},
        "mlflow.tracking_uri: Value error, use a database URI .* a folder path or file:// URI",
    ),
    ({"mlflow": {"tracking_uri": "file:///tmp/mlruns"}}, "mlflow.tracking_uri: Value error, use a database URI"),
    (
        {"mlflow": {"tracking_uri": "sqlite://mlflow.db"}},
        "mlflow.tracking_uri: Value error, use a database URI .sqlite:///FILE",
    ),
    ({"mlflow": {"tracking_uri": "ftp://user:hunter2@host/x"}}, "got 'ftp://\\*\\*\\*@host/x'"),
    (
        {"models": {"variants": {"conv": {"kernel_size": 4, "form": "full_attention"}}}},
        "models.variants.conv: kernel_size",
    ),
    ({"models": {"variants": {"conv": {"form": "hybrid"}}}}, "models.variants.conv: form='hybrid'"),
    ({"models": {"variants": {"conv": {"stem": "patchify"}}}}, "models.variants.conv: stem"),
    ({"models": {"variants": {"conv": {"heads": 3, "form": "full_attention"}}}}, "models.variants.conv: out_channels"),
    (
        {"models": {"common": {"small_input": False}}},
        "data.resolution=28 does not fit models.variants.conv: it needs at least 32 px",
    ),
    ({"models": {"variants": {}}}, "models.variants"),
    ({"report": None}, "report: Input should be a valid dictionary"),
    ({"train": {"limit_train_batches": 1.5}}, "train.limit_train_batches"),
    ({"train": {"warmup_epochs": 3, "epochs": 2}}, "warmup_epochs=3.0 exceeds train.epochs=2"),
    (
        {"train": {"strategy": "dpp"}},
        "train.strategy: Value error, unknown or unsupported strategy; allowed: auto, ddp",
    ),
    ({"train": {"strategy": "ddp_spawn"}}, "train.strategy: Value error, unknown or unsupported strategy"),
    (
        {"sweep": {"train": {"strategy": "ddp_fork_find_unused_parameters_true"}}},
        "a trial's train values are invalid:\n  strategy: Value error",
    ),
    (
        {"data": {"path": "/data/imagenet"}},
        "data.path='/data/imagenet' is set but data.source is mnist5k, which ignores it",
    ),
    ({"train": {"checkpoint_dir": ""}}, "train.checkpoint_dir"),
    (
        {"sweep": {"space": {"kernel": [3, 5]}}},
        "sweep.space: Value error, 'kernel' cannot be swept; allowed: form, stem",
    ),
    (
        {"sweep": {"space": {"lr": {"normal": [0, 1]}}}},
        "sweep.space: Value error, lr: give a list .grid. or exactly one of choice",
    ),
    ({"sweep": {"space": {"lr": {"loguniform": [0.1]}}}}, "lr: loguniform takes \\[low, high\\]"),
    (
        {"sweep": {"space": {"kernel_size": {"randint": [3, 9]}}}},
        "kernel_size: architecture keys take a list or choice",
    ),
    ({"sweep": {"space": {"lr": []}}}, "lr: an empty grid"),
    ({"sweep": {"base": "nope"}}, "sweep.base='nope' is not in models.variants; defined: conv"),
    (
        {"sweep": {"metric": "val_loss", "mode": "max"}},
        "sweep.mode='max' would pick the worst trial by val_loss; use mode: min",
    ),
    ({"sweep": {"train": {"epoch": 3}}}, "sweep: a trial's train values are invalid:\n  epoch: unknown key"),
    (
        {"sweep": {"space": {"lr": [0.1, -1]}}},
        "a trial's train values are invalid:\n  lr: Input should be greater than 0",
    ),
    ({"sweep": {"scheduler": {"grace_period": 2}}}, "sweep.scheduler.grace_period=2 exceeds the trials' 1 epochs"),
    (
        {"sweep": {"space": {"kernel_size": [3, 4], "form": ["full_attention"]}}},
        "sweep.space {'kernel_size': 4, 'form': 'full_attention'}: kernel_size must be odd",
    ),
    ({"sweep": {"resources": {"gpu": -1}}}, "sweep.resources.gpu"),
    ({"sweep": {"name": "a b"}}, "sweep.name"),
    (
        {"models": {"variants": {"conv": {"model": "retinanet_resnet26"}}}},
        "models.variants.conv: retinanet_resnet26 is a detection model, and data.source='mnist5k' feeds "
        "classification models (cvt13 | cvt21 | resnet26 | resnet38 | resnet50 | timm:NAME); detection models "
        "train on data.source digit_canvases | coco",
    ),
    (
        {"data": {"source": "digit_canvases"}},
        "models.variants.conv: resnet26 is a classification model, and data.source='digit_canvases' feeds "
        "detection models (retinanet_resnet26 | retinanet_resnet38 | retinanet_resnet50)",
    ),
    (
        {"data": {"source": "digit_canvases"}, "models": {"common": {"model": "retinanet_resnet26"}}},
        "sweep.metric='val_top1': detection runs are compared by val_map",
    ),
    (
        {"models": {"variants": {"conv": {"head_mixer": "sasa"}}}},
        "models.variants.conv: head_mixer: options of the detectors; resnet26 is a classifier",
    ),
    ({"data": {"canvas": {"digit_sizes": [20, 10]}}}, "data.canvas.digit_sizes: .low, high. with low <= high"),
    ({"data": {"canvas": {"size": 32}}}, "data.canvas.digit_sizes: 64 px exceeds the 32 px canvas"),
    (
        {"data": {"source": "digit_canvases", "path": "/x"}},
        "data.path='/x' is set but data.source is digit_canvases, which ignores it",
    ),
]


@pytest.mark.parametrize("overrides,needle", BAD)
def test_bad_values_name_the_key(tmp_path, overrides, needle):
    write_params(tmp_path, overrides)
    with pytest.raises(
        ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")
    ) as err:
        load_config(tmp_path / "params.yaml")
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:////abs/mlflow.db",
        "postgresql://user:pw@db.example:5432/mlflow",
        "postgresql+psycopg2://db/mlflow",
        "mysql+pymysql://user@db/mlflow",
        "mssql+pyodbc://db/mlflow",
        "http://127.0.0.1:5000",
        "https://user:token@mlflow.example",
        "databricks",
    ],
)
def test_any_sqlalchemy_database_or_server_is_a_tracking_uri(tmp_path, uri):
    write_params(tmp_path, {"mlflow": {"tracking_uri": uri}})
    assert load_config(tmp_path / "params.yaml").mlflow.tracking_uri == uri


def test_validating_builds_every_model_without_lightning(tmp_path):
    """Every stage validates the whole file, so prepare, the first, stops on a bad model value; that
    check builds on the meta device and does not import Lightning (prepare does not need it)."""
    import subprocess
    import sys

    write_params(tmp_path, {"sweep": {"space": {"kernel_size": [3, -3]}}})
    code = (
        "import sys; from pipeline.config import ConfigError, load_config\n"
        f"try: load_config({str(tmp_path / 'params.yaml')!r})\n"
        "except ConfigError as err: print(err)\n"
        "assert 'lightning' not in sys.modules, 'Lightning imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sweep.space {'kernel_size': -3}: kernel_size" in proc.stdout


def test_the_strategies_are_lightnings_that_start_before_fit():
    """STRATEGIES is written out so that checking a name does not import Lightning: it must be Lightning's
    registry less the strategies that spawn their processes inside fit."""
    from lightning.pytorch.strategies import StrategyRegistry

    from pipeline.config import STRATEGIES

    spawned = ("_spawn", "_fork", "_notebook")  # also ddp_spawn_find_unused_parameters_true and the like
    assert set(STRATEGIES) == {"auto"} | {
        s for s in StrategyRegistry.available_strategies() if not any(word in s for word in spawned)
    }


def test_yaml_syntax_error_and_missing_file(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="no such parameters file"):
        load_config(tmp_path / "nope.yaml")


def test_fingerprint_changes_only_with_the_variants_own_settings(tmp_path):
    write_params(tmp_path, {"models": {"variants": {"conv": {"form": "conv"}, "attn": {"form": "full_attention"}}}})
    before = load_config(tmp_path / "params.yaml")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["models"]["variants"]["attn"]["kernel_size"] = 5
    params["mlflow"]["experiment"] = "elsewhere"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    after = load_config(tmp_path / "params.yaml")
    assert before.fingerprint("conv", 0) == after.fingerprint("conv", 0)
    assert before.fingerprint("attn", 0) != after.fingerprint("attn", 0)


@pytest.mark.parametrize("source", ["params.yaml", *sorted(p.name for p in (REPO / "configs").glob("*.yaml"))])
def test_every_params_file_has_every_key_dvc_tracks(source, tmp_path):
    """DVC stops on a tracked key missing from params.yaml: the default and every preset's output
    spell each one out."""
    from pipeline.preset import apply

    if source == "params.yaml":
        params = yaml.safe_load((REPO / source).read_text())
    else:
        apply(REPO / "configs" / source, out=tmp_path / "params.yaml")
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    present = leaves(params)
    for stage, listed in stage_params().items():
        missing = {e for e in listed if "${" not in e and not any(within(k, e) for k in present)}
        assert not missing, (stage, missing)
