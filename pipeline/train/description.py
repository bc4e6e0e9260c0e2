"""What the driver hands every training worker: the checked config, the data (in Ray's object store: it grows
with the samples, and arguments are copied to every worker), and where the job started."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.train.config import Config


@dataclass(frozen=True)
class TrainingJob:
    config: Config  # the run's, validated once, in the driver, with data.root absolute (job.train)
    data: Any  # ray.ObjectRef of the TrainingData (pipeline.train.splits)
    started_at: float  # time.time() at the command's start: the first step's start-up counts from there
    storage_marker: dict  # shared_storage: what every worker must find in the run folder
    events: Any = None  # the driver's line relay (progress.relay), set once the run starts
