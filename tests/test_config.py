"""Config validation: every mistake is one line naming the key, exit code 2, and no Ray left running."""

import json
import subprocess
import sys

import pytest
import ray
from pydantic import BaseModel

from jobs.cli import main
from pipeline.train.config import Config, load_config
from tests.helpers import REPO, fresh_env, make_image_folder, write_config


@pytest.fixture
def config(tmp_path, tiny_folder):
    return write_config(tmp_path / "c.yaml", "t", tiny_folder, tmp_path / "runs")


def run_cli(capsys, *argv):
    code = main(["train", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=0.1", "unknown key 'train.lrr'; allowed keys here: epochs, batch_size, lr"),
        ("bogus=1", "unknown key 'bogus'"),
        ("train.epochs=ten", "train.epochs: Input should be a valid integer"),
        ("train.epochs=0", "train.epochs: Input should be greater than 0"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("train.momentum=1.5", "train.momentum: Input should be less than 1"),
        ("model.mode=frozen", "model.mode: Input should be 'finetune' or 'feature_extraction'"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu"),
        ("scaling.num_workers=0", "scaling.num_workers: Input should be greater than 0"),
        ("train.amp=fp8", "train.amp: Input should be 'off', "),
        ("name=a/b", "name: String should match pattern"),
        ("train.epochs", "override 'train.epochs' must look like key.sub=value"),
        ("model.weights=missing.pth", "model.weights: file missing.pth not found"),
        ("data.min_score=2", "data.min_score: Input should be less than or equal to 1"),
        ("model.head_from_imagenet={red: ant}", "model.head_from_imagenet: copies rows of the ImageNet classifier, "
                                                "so it needs model.weights: imagenet; or set "
                                                "model.head_from_imagenet=null for a random head (got {'red': 'ant'})"),
        ("tracking.mlflow_ur=x", "unknown key 'tracking.mlflow_ur'; allowed keys here: mlflow_uri, mlflow_experiment"),
    ],
)
def test_bad_config_is_one_line_and_exit_2_before_ray_starts(capsys, config, override, expected):
    """Found before Ray starts: in the fast tier, where starting Ray fails the test, that is checked too."""
    ray_was_up = ray.is_initialized()
    code, err = run_cli(capsys, "-c", config, override)
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1 and err.startswith("imgjobs train: error:")
    assert ray.is_initialized() == ray_was_up


# Found while Ray starts: the model is built, the run folder written and the MLflow server asked meanwhile.
FOUND_ONCE_RAY_STARTED = [
    ("model.arch=resnet1800", "model.arch: unknown architecture 'resnet1800'"),
    ("model.trainable=[layer9]", "model.trainable: no module 'layer9'"),
    ("storage.path=/proc/imgjobs-runs", "storage.path /proc/imgjobs-runs cannot be written: "),
    ("tracking.mlflow_uri=http://127.0.0.1:9", "tracking.mlflow_uri http://127.0.0.1:9: MlflowException: API "
                                               "request to http://127.0.0.1:9/api/2.0/mlflow/experiments/"),
    ("tracking.mlflow_uri=file:mlruns", "MLflow 3 uses a file store only with MLFLOW_ALLOW_FILE_STORE=true"),
]


@pytest.mark.parametrize("override, expected", FOUND_ONCE_RAY_STARTED)
def test_bad_config_found_once_ray_started_is_one_line_and_exit_2(ray_local, capsys, config, override, expected,
                                                                  monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, err = run_cli(capsys, "-c", config, override)
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1 and err.startswith("imgjobs train: error:")


def test_head_from_imagenet_for_a_class_the_data_lacks_is_one_line_and_exit_2(ray_local, capsys, config):
    code, err = run_cli(capsys, "-c", config, "model.weights=imagenet", "model.head_from_imagenet={wasps: wasp}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "model.head_from_imagenet: 'wasps' is not one of the data's classes (blue, red); use those as its " \
           "keys" in err


@pytest.mark.ray
def test_a_mistake_found_once_ray_started_stops_the_ray_the_job_started(config):
    """In a process of its own, as a user or a notebook runs it: the Ray it started is stopped again."""
    code = ("import sys, ray\nfrom jobs.cli import main\nrc = main(sys.argv[1:])\n"
            "print('ray still up' if ray.is_initialized() else 'ray stopped')\nsys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "train", "-c", str(config), "model.arch=resnet1800"],
                            cwd=REPO, env=fresh_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ray stopped"
    errors = [line for line in result.stderr.splitlines() if line.startswith("imgjobs train: error:")]
    assert len(errors) == 1 and "model.arch: unknown architecture 'resnet1800'" in errors[0]


def test_missing_data_folder(capsys, config, tmp_path):
    code, err = run_cli(capsys, "-c", config, f"data.root={tmp_path / 'nowhere'}")
    assert code == 2 and "data.root:" in err and "has no train/ folder" in err


def test_missing_config_file(capsys, tmp_path):
    code, err = run_cli(capsys, "-c", tmp_path / "absent.yaml")
    assert code == 2 and "cannot read config" in err


def test_missing_required_key(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text(json.dumps({"name": "x"}))
    code, err = run_cli(capsys, "-c", tmp_path / "c.yaml")
    assert code == 2 and "data is required" in err


@pytest.mark.parametrize(
    "layout, expected",
    [
        ({"train": ["a", "b"], "val": ["a", "c"]}, "val classes ['a', 'c'] differ from train classes ['a', 'b']"),
        ({"train": ["a"], "val": ["a"]}, "needs at least two class folders"),
        ({"train": ["a", "b", "empty"], "val": ["a", "b", "empty"]}, "empty has no images"),
    ],
)
def test_bad_folder_layout(capsys, tmp_path, layout, expected):
    root = tmp_path / "data"
    make_image_folder(root / "_src", classes=("a", "b", "c"), train_per_class=2, val_per_class=2)
    for split, classes in layout.items():
        for name in classes:
            target = root / split / name
            target.mkdir(parents=True)
            if name != "empty":
                for f in (root / "_src" / split / name).iterdir():
                    (target / f.name).write_bytes(f.read_bytes())
    config = write_config(tmp_path / "c.yaml", "t", root, tmp_path / "runs")
    code, err = run_cli(capsys, "-c", config)
    assert code == 2 and expected in err


def test_overrides_are_parsed_as_yaml(tmp_path, tiny_folder):
    config = write_config(tmp_path / "c.yaml", "t", tiny_folder, tmp_path / "runs")
    cfg = load_config(str(config), ["train.lr=1e-2", "model.trainable=[layer4, fc]", "scaling.use_gpu=true"])
    assert cfg.train.lr == 0.01 and cfg.model.trainable == ["layer4", "fc"] and cfg.scaling.use_gpu is True


def test_shipped_configs_hold_the_seed_recipe():
    seed = load_config(str(REPO / "configs" / "train.yaml"))
    model = seed.model
    assert (model.arch, model.weights, model.mode, model.trainable) == ("resnet18", "imagenet", "finetune", "all")
    t = seed.train
    assert (t.lr, t.momentum, t.step_size, t.gamma, t.batch_size, t.epochs) == (0.001, 0.9, 7, 0.1, 4, 25)
    fe = load_config(str(REPO / "configs" / "feature_extraction.yaml"))
    assert fe.model.mode == "feature_extraction" and fe.train == seed.train
    demo = load_config(str(REPO / "configs" / "demo.yaml"))
    assert (demo.model.arch, demo.model.weights, demo.model.mode) == ("efficientnet_lite0", "imagenet",
                                                                      "feature_extraction")


def test_every_config_key_is_in_the_docs_key_tables():
    for doc in ("README.md", "docs/training.md"):
        text = (REPO / doc).read_text()
        assert [key for key in config_keys() if f"`{key}`" not in text] == [], doc


def config_keys(section: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in section.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += config_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys
