"""Training's terminal output: rank 0 sends its lines and in-epoch progress through a Ray queue, and the driver
prints them (pipeline.console), so they read as the job's own lines, redrawn in place on a terminal."""

from __future__ import annotations

import contextlib
import threading
import time

import ray
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.console import Console, duration

SEND_EVERY_S = 1.0


class Reporter:
    """Worker side. Only rank 0 sends; the others stay quiet."""

    def __init__(self, events: Queue | None, rank: int, world: int, epochs: int):
        self.events = events if rank == 0 else None
        self.world, self.epochs = world, epochs
        self.epoch = self.steps = 0
        self.started = self.last_sent = 0.0
        self.epoch_seconds = None  # the last whole epoch's, for the run's ETA

    def line(self, text: str) -> None:
        if self.events is not None:
            self.events.put(("line", text))

    def stop(self, reason: str) -> None:
        """The run ends here on purpose, for this reason, which the driver reports as the job's error."""
        if self.events is not None:
            self.events.put(("stop", reason))

    def start_epoch(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps = epoch, steps
        self.started = self.last_sent = time.perf_counter()

    def step(self, step: int, images: int) -> None:
        """After `step` of this epoch's steps, `images` of them trained on this worker."""
        now = time.perf_counter()
        if self.events is None or now - self.last_sent < SEND_EVERY_S:
            return
        self.last_sent = now
        elapsed = now - self.started
        epoch_eta = (self.steps - step) * elapsed / step
        per_epoch = self.epoch_seconds or self.steps * elapsed / step
        run_eta = epoch_eta + (self.epochs - self.epoch - 1) * per_epoch
        self.events.put(("progress", f"epoch {self.epoch + 1}/{self.epochs}  step {step}/{self.steps}  "
                                     f"{images * self.world / elapsed:.1f} img/s  "
                                     f"ETA {duration(epoch_eta)} epoch, {duration(run_eta)} run"))

    def end_epoch(self, metrics: dict) -> None:
        """After the epoch's checkpoint is reported: the driver logs its metrics (MLflow)."""
        self.epoch_seconds = metrics["epoch_seconds"]
        if self.events is not None:
            self.events.put(("epoch", metrics))


@contextlib.contextmanager
def relay(console: Console, on_epoch=lambda metrics: None):
    """Driver side: yields the queue to hand the workers and a list that collects their stop reasons, prints
    what comes through the queue until the block ends, and hands each finished epoch's metrics to on_epoch."""
    # On the driver's node, which the job cannot outlive anyway: anywhere else, losing that node (a spot
    # preemption) would fail every restarted worker at its first line. It holds no CPU: every CPU trains.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    stopped = []
    handlers = {"line": console.line, "progress": console.progress, "stop": stopped.append, "epoch": on_epoch}

    def pump():
        # One get waits at a time, for as long as it takes: polling would cost the queue's actor and this process
        # CPU that, on a small machine, training lacks. The driver's own "end" ends it.
        for kind, payload in iter(events.get, ("end", None)):
            handlers[kind](payload)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield events, stopped
    finally:
        events.put(("end", None))
        thread.join()
        console.close()
        events.shutdown()
