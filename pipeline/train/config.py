"""Training config: YAML files plus `key.sub=value` overrides, validated before Ray starts."""

from __future__ import annotations

import os
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator

from pipeline import storage
from pipeline.errors import UsageError


class _Section(BaseModel):
    # strict: YAML already gives typed values, so "1" must not quietly become True or 1. frozen: validated once,
    # the config travels to the workers as it is; a changed copy is made with model_copy(update=...).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# YAML 1.1 reads 1e-3 (no dot) as a string, so float keys also accept numeric strings.
LaxFloat = Annotated[float, Strict(False)]


class DataConfig(_Section):
    root: str = Field(description="image folder tree holding train/ and val/, or a labels Parquet (file or folder)")
    min_score: LaxFloat = Field(0.0, ge=0, le=1, description="labels Parquet: leave out rows scored below this")
    accepted_only: bool = Field(False, description="labels Parquet: keep only rows whose `accepted` is true "
                                                   "(imgjobs label --target-precision)")
    calibration_fraction: LaxFloat = Field(0.5, ge=0, lt=1, description="the share of val, picked by a seeded "
                                           "hash of each image's key, kept for `imgjobs label --target-precision` "
                                           "and never used to choose the best epoch; 0 keeps none")
    val_fraction: LaxFloat = Field(0.2, gt=0, lt=1, description="labels Parquet without a split column: the share of "
                                                               "each class held out for val")
    split_seed: int = Field(0, description="labels Parquet: the seed of that split")
    max_unreadable: float = Field(0.5, ge=0, le=1, description="stop when a larger share of a split's files fails "
                                                               "to read or decode")
    shuffle_buffer: int = Field(256, ge=0, description="shards: encoded images each DataLoader process holds to "
                                "shuffle the members it streams (WebDataset's buffer); 0 or 1: stored order")
    exact_decode: bool = Field(False, description="decode every JPEG at full size; by default a big one decodes at "
                                                  "a reduced scale that still gives every crop its full pixels")
    exclude: str | None = Field(None, description="an imgjobs audit folder (<storage.path>/<name>/audit): leave out "
                                "the images it marks as suspects")

    @field_validator("root", "exclude")
    @classmethod
    def _no_credentials(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A UsageError, which pydantic passes on as it is: a ValidationError's line would quote the secret.
        if value is not None:
            storage.refuse_credentials(value, f"config error: data.{info.field_name}")
        return value


class ModelConfig(_Section):
    arch: str = "resnet18"
    weights: str = Field("imagenet", description="imagenet, none, or a path to a state_dict file")
    mode: Literal["finetune", "feature_extraction"] = "finetune"
    trainable: Literal["all"] | list[str] = "all"
    head_from_imagenet: dict[str, str] | None = Field(None, description="{class: ImageNet class name}, e.g. {ants: "
                                                      "ant}: those classes' outputs start from the ImageNet "
                                                      "classifier's rows for the names, not random ones")

    @field_validator("head_from_imagenet")
    @classmethod
    def _needs_imagenet_weights(cls, value, info: ValidationInfo):
        if value and info.data.get("weights") != "imagenet":
            raise ValueError("copies rows of the ImageNet classifier, so it needs model.weights: imagenet; or set "
                             "model.head_from_imagenet=null for a random head")
        return value


class TrainConfig(_Section):
    epochs: int = Field(25, gt=0)
    batch_size: int = Field(4, gt=0, description="per worker")
    lr: LaxFloat = Field(0.001, gt=0)
    momentum: LaxFloat = Field(0.9, ge=0, lt=1)
    step_size: int = Field(7, gt=0)
    gamma: LaxFloat = Field(0.1, gt=0, le=1)
    label_smoothing: LaxFloat = Field(0.0, ge=0, lt=1, description="CrossEntropyLoss's: the share of each target "
                                      "spread over all classes (train and val loss)")
    seed: int = 0
    num_data_workers: int = Field(2, ge=0, description="DataLoader processes per training worker")
    amp: Literal["off", "auto", "bf16", "fp16"] = Field("off", description="autocast dtype on GPU workers (CPU "
                                                        "workers train in fp32); auto: bf16 where the GPU computes it "
                                                        "natively (sm_80 and up), else fp16 with a GradScaler")
    channels_last: bool = Field(False, description="GPU only")
    max_failures: int = Field(3, ge=0, description="worker-group restarts before the run fails")
    max_preemption_failures: int = Field(-1, ge=-1, description="restarts after a node's preemption (spot "
                                                                "reclaim) before the run fails; -1: no limit")
    max_steps_per_epoch: int | None = Field(None, gt=0, description="end each epoch after this many steps, and "
                                            "its val pass after as many batches: for smoke runs on big data")
    preemption_check_seconds: LaxFloat = Field(5.0, ge=0, description="the workers look for a preemption notice "
                                               "at least this often while they train, and at each epoch's end (a "
                                               "notice comes 30 s to 2 min before the reclaim); 0: after every step")


class AuditConfig(_Section):
    folds: int = Field(5, ge=2, description="imgjobs audit: the K of its K-fold out-of-fold probabilities")
    method: Literal["linear", "train"] = Field("linear", description="imgjobs audit: how each fold predicts the "
                                               "images it holds out: linear, a linear head fitted on frozen "
                                               "features of the others; train, this config's own training on them")
    checkpoint: str | None = Field(None, description="imgjobs audit: a checkpoint of imgjobs train whose backbone "
                                   "gives the linear method's features; by default model.arch with model.weights")
    batch_size: int = Field(32, gt=0, description="imgjobs audit: images per batch of its feature pass")
    part_images: int = Field(1024, gt=0, description="imgjobs audit: images per task of its feature pass, each "
                             "written once: the most a killed audit's rerun redoes, and the unit run in parallel")

    @field_validator("checkpoint")
    @classmethod
    def _linear_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("method") == "train":
            raise ValueError("only audit.method linear uses it, as its features' backbone (train trains model.* per "
                             "fold); drop it, or set audit.method=linear")
        return value


class ScalingConfig(_Section):
    num_workers: int = Field(1, gt=0)
    use_gpu: Literal["auto"] | bool = "auto"


class StorageConfig(_Section):
    path: str = Field("runs", description="local folder or pyarrow URI (s3://, gs://, ...)")

    @field_validator("path")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        storage.refuse_credentials(value, "config error: storage.path")  # as data.root's
        return value


class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (http://host:5000, databricks, "
                                   "file:./mlruns): params, per-epoch metrics and plots go there")
    mlflow_experiment: str = Field("imgjobs", min_length=1, description="the MLflow experiment of the runs")


class Config(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    audit: AuditConfig = AuditConfig()


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `a.b=value` overrides (values parsed as YAML) and validate."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror}; pass an existing YAML file with -c") from e
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise UsageError(f"config {path} must be a YAML mapping of sections (name, data, model, ...)")
    for item in overrides:
        _apply_override(raw, item)
    return validate(raw)


def check_weights_file(weights: str) -> None:
    """A weights path must name a file: answered here, before torch loads to read it."""
    if weights not in ("imagenet", "none") and not os.path.isfile(os.path.expanduser(weights)):
        raise UsageError(f"model.weights: file {weights} not found; use imagenet, none or a state_dict path")


def validate(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UsageError(_describe(e.errors()[0])) from None


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"override {item!r} must look like key.sub=value, e.g. train.epochs=5")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"override {key}: {part} is not a section")
    node[leaf] = parsed


def _describe(err: dict) -> str:
    """One line naming the key, what is wrong and what is allowed."""
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("literal[", "list[", "bool", "str"))]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        parent = _section_for(loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        return f"config error: unknown key {key!r}; allowed keys here: {allowed}"
    if err["type"] == "missing":
        return f"config error: {key} is required"
    return f"config error: {key}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"


def _section_for(path: list[str]):
    model = Config
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model
