"""`imgjobs label`'s options, checked the way training's config is: a pydantic model, and one line naming the option
on a mistake. Light to import: the command checks them before torch and Ray load."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.formats.archives import Limits
from pipeline.images import MAX_PIXELS


class LabelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # read by the job, never changed

    checkpoint: str
    inputs: list[str] = Field(min_length=1)
    output: str
    top_k: int | None = Field(None, ge=1)  # at most the checkpoint's classes: checked once it is loaded
    min_confidence: float = Field(0.0, ge=0, le=1)
    target_precision: float | None = Field(None, gt=0, lt=1)
    calibration: str | None = None  # a class-folder tree whose held-out scores set the thresholds
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    exact_decode: bool = False
    rows_per_file: int = Field(100_000, ge=1)
    commit_every: float = Field(60.0, gt=0)
    max_member_mb: float = Field(Limits.member_bytes / 2**20, gt=0)
    max_archive_gb: float = Field(Limits.archive_bytes / 2**30, gt=0)
    max_archive_members: int = Field(Limits.archive_members, ge=1)
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    batch_size: int | None = Field(None, ge=1)
    max_actors: int | None = Field(None, ge=1)
    overwrite: bool = False
    evaluate: bool = False
    embeddings: bool = False
    report: bool = False

    @field_validator("checkpoint", "inputs", "output", "calibration")
    @classmethod
    def _no_credentials(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        option = "--input" if info.field_name == "inputs" else f"--{info.field_name}"
        for uri in value if isinstance(value, list) else [value] if value else []:
            storage.refuse_credentials(uri, option)  # a UsageError: pydantic passes it on as it is
        return value

    @model_validator(mode="after")
    def _calibration_serves_a_target(self) -> LabelOptions:
        if self.calibration and self.target_precision is None:
            raise UsageError("--calibration only sets the thresholds of --target-precision; add --target-precision P "
                             "or leave --calibration out")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(member_bytes=int(self.max_member_mb * 2**20), archive_bytes=int(self.max_archive_gb * 2**30),
                      archive_members=self.max_archive_members)

    @classmethod
    def checked(cls, **values) -> LabelOptions:
        """The options, or a UsageError naming the first wrong one as the command line spells it."""
        try:
            return cls(**values)
        except ValidationError as e:
            error = e.errors()[0]
            option = "--" + str(error["loc"][0]).replace("_", "-")
            raise UsageError(f"{option} {error.get('input')}: {error['msg']}") from None


def default(name: str):
    """An option's default, for the command's help."""
    return LabelOptions.model_fields[name].default
