"""What the driver hands every training worker: the checked config, the data, and where the job started."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.train.splits import TrainingData


@dataclass(frozen=True)
class TrainingJob:
    config: dict  # the run's Config as JSON values: workers validate it again (pipeline.train.config)
    data: TrainingData
    started_at: float  # time.time() at the command's start: the first step's start-up counts from there
    storage_marker: str  # shared_storage: what every worker must find in the run folder
    events: Any = None  # the driver's line relay (progress.relay), set once the run starts
