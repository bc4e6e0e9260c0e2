"""What the driver hands every training worker: the checked config, the data (in Ray's object store: it grows
with the samples, and arguments are copied to every worker), and where the job started."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingJob:
    config: dict  # the run's Config as JSON values: workers validate it again (pipeline.train.config)
    data: Any  # ray.ObjectRef of the TrainingData (pipeline.train.splits)
    started_at: float  # time.time() at the command's start: the first step's start-up counts from there
    storage_marker: str  # shared_storage: what every worker must find in the run folder
    events: Any = None  # the driver's line relay (progress.relay), set once the run starts
