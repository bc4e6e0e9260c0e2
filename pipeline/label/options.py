"""`imgjobs label`'s options, checked the way training's config is: a pydantic model, and one line naming the option
on a mistake. Light to import: the command checks them before torch and Ray load."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import UsageError
from pipeline.keys import MAX_MEMBER_BYTES


class LabelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    inputs: list[str] = Field(min_length=1)
    output: str
    top_k: int | None = Field(None, ge=1)  # at most the checkpoint's classes: checked once it is loaded
    min_confidence: float = Field(0.0, ge=0, le=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    exact_decode: bool = False
    rows_per_file: int = Field(100_000, ge=1)
    commit_every: float = Field(60.0, gt=0)
    max_member_mb: float = Field(MAX_MEMBER_BYTES / 2**20, gt=0)
    batch_size: int | None = Field(None, ge=1)
    max_actors: int | None = Field(None, ge=1)
    overwrite: bool = False
    evaluate: bool = False
    embeddings: bool = False
    report: bool = False

    @property
    def max_member_bytes(self) -> int:
        return int(self.max_member_mb * 2**20)

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
