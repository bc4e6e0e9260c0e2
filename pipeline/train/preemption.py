"""When the training workers look for a notice of their node's preemption (a spot reclaim)."""

from __future__ import annotations

import math
import time


class PreemptionClock:
    """When this worker wants the workers to look for a preemption notice after the coming step: once `every`
    seconds will have passed since they last looked by that step's end, judged by the last step's length (so a step
    longer than that is always followed by a look), after the epoch's last step, and after the run's first step,
    whose length is not known yet. The wish rides on the step's all-reduce that the ranks make anyway
    (distributed.agree): they look together when any of them wishes. `clock`: seconds, monotonic."""

    def __init__(self, every: float, clock=time.perf_counter):
        self.every, self.clock = every, clock
        self.looked_at = self.fetched_at = clock()
        self.step_seconds = math.inf  # the last step's, its batch's loading included
        self.last_step, self.in_epoch = 0, False

    def start_epoch(self, last_step: int) -> None:
        """An epoch whose last step is `last_step` begins: the time until its first batch is no step's."""
        self.last_step, self.in_epoch = last_step, False

    def wants(self, step: int) -> bool:
        now = self.clock()
        if self.in_epoch:
            self.step_seconds = now - self.fetched_at
        self.fetched_at, self.in_epoch = now, True
        return step == self.last_step or now - self.looked_at + self.step_seconds >= self.every

    def looked(self) -> None:
        self.looked_at = self.clock()
