"""MLflow tracking, when `tracking.mlflow_uri` is set: the run's config as params, each epoch's metrics as the
epoch ends, and its plots, metrics.csv and summary.json as artifacts when it finishes.

One MLflow run per imgjobs run. Its id is kept in <run>/mlflow.json, so a resumed run goes on logging into the
same MLflow run without logging an epoch twice, and `--fresh` (which moves the run folder aside) starts a new one.
MLflow is an optional extra (`pip install 'imgjobs[mlflow]'`); the driver alone talks to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

from pipeline import storage
from pipeline.errors import UsageError

RUN_ID_FILE = "mlflow.json"
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s")
RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
ARTIFACTS = ("summary.json", "metrics.csv", "curves.png", "confusion_matrix.png", "predictions.png")


class MlflowRun:
    """Opens (or reopens) the run's MLflow run before training starts, so a wrong URI fails first."""

    def __init__(self, uri: str, experiment: str, name: str, run_dir: str, config: dict, log=print):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise UsageError("tracking.mlflow_uri is set but MLflow is not installed; pip install 'imgjobs[mlflow]' "
                             "(or mlflow), or remove tracking.mlflow_uri") from None
        self.log, self.warned = log, False
        self.fs, base = storage.resolve(run_dir)
        self.id_file = f"{base}/{RUN_ID_FILE}"
        try:
            with few_retries():
                self.client = MlflowClient(uri)
                self.run_id = self._reopen(uri) or self._create(uri, experiment, name, run_dir, config)
                self.logged = {m.step for m in self.client.get_metric_history(self.run_id, "val_acc")}
        except Exception as e:  # MLflow raises its own exceptions, and requests' for a server out of reach
            if "MLFLOW_ALLOW_FILE_STORE" in str(e):
                raise UsageError(f"tracking.mlflow_uri {uri}: MLflow 3 uses a file store only with "
                                 "MLFLOW_ALLOW_FILE_STORE=true in the environment; set it, or use a tracking server") \
                    from None
            raise UsageError(f"tracking.mlflow_uri {uri}: {type(e).__name__}: {str(e).splitlines()[0][:160]}; check "
                             "the URI and that the server is up") from None
        log(f"{name}: MLflow run {self.run_id} in experiment {experiment!r} at {uri}")

    def _reopen(self, uri: str) -> str | None:
        try:
            saved = json.loads(storage.read_bytes(self.fs, self.id_file))
        except FileNotFoundError:
            return None
        if saved.get("tracking_uri") != uri:
            return None
        self.client.update_run(saved["run_id"], status="RUNNING")
        return saved["run_id"]

    def _create(self, uri: str, experiment: str, name: str, run_dir: str, config: dict) -> str:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run_id = self.client.create_run(experiment_id, run_name=name, tags={"imgjobs.run_dir": run_dir}).info.run_id
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(config).items()])
        storage.write_bytes(self.fs, self.id_file, json.dumps({"tracking_uri": uri, "run_id": run_id}).encode())
        return run_id

    def epoch(self, metrics: dict) -> None:
        """Log one epoch's metrics, once. A tracking server that fails does not stop the training: one warning."""
        if metrics["epoch"] in self.logged:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._safely(lambda: self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(metrics[k]), now, metrics["epoch"]) for k in METRICS]))
        self.logged.add(metrics["epoch"])

    def finish(self, summary: dict) -> None:
        """The epochs no event carried (a restarted driver's), the run's files, and FINISHED."""
        for metrics in summary["epochs"]:
            self.epoch(metrics)
        self.client.set_tag(self.run_id, "imgjobs.best_checkpoint", summary["best_checkpoint"])
        fs, base = storage.resolve(summary["run_dir"])
        with tempfile.TemporaryDirectory() as tmp:
            for name in ARTIFACTS:
                (Path(tmp) / name).write_bytes(storage.read_bytes(fs, f"{base}/{name}"))
            self._safely(lambda: self.client.log_artifacts(self.run_id, tmp))
        self._safely(lambda: self.client.set_terminated(self.run_id, "FINISHED"))

    def failed(self) -> None:
        self._safely(lambda: self.client.set_terminated(self.run_id, "FAILED"))

    def _safely(self, call) -> None:
        try:
            call()
        except Exception as e:
            if not self.warned:
                self.log(f"warning: MLflow logging failed, training goes on: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}")
                self.warned = True


@contextlib.contextmanager
def few_retries():
    """MLflow retries a request for minutes by default: right for a run's logging, not for the check at start."""
    saved = os.environ.get(RETRIES)
    os.environ[RETRIES] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[RETRIES]
        else:
            os.environ[RETRIES] = saved


def flatten(config: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.01}} -> {"train.lr": 0.01}, the keys as overrides name them."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
