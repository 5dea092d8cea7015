"""`TrainingQueue`: the LoRA training an engine runs when it has nothing to serve.

The engine's loop calls `run_step()` only while no request is active or waiting (`StepEngine`'s
`background`), so training yields to serving at step granularity: a request that arrives waits
for at most the training step in progress. `pause()` is the engine saying it is serving again.
One run at a time per replica (a second `submit` is refused as busy, which the job manager
waits out). Each run checkpoints every `checkpoint_every` steps into `<root>/<job id>/`; a job
submitted again (a retried attempt after a replica restart) resumes there. When the run ends,
its LoRA is published in the registry under its name, its checkpoints are removed, and its
caller gets the `.safetensors` bytes. A cancelled or failed run keeps its checkpoints until the
job manager discards them (a user's cancel, a job out of attempts).

Thread model: `submit`, `cancel` and `discard` from any thread; `run_step` and `pause` on the
engine's. Knows torch (through the trainer); never Ray or HTTP.
"""

import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from deployments.lora_registry import SUFFIX, LoraRegistry
from deployments.training import LoraTrainingSettings, TrainingExample, TrainingProgress, TrainingResult
from deployments.types import EngineError, OverloadedError, RequestCancelledError, ServiceError

logger = logging.getLogger(__name__)


@dataclass
class TrainingControl:
    """The caller's side of one run: progress and the outcome come back through the callbacks
    (from the engine's thread); `cancel` stops the run at its next step."""

    on_progress: Callable[[TrainingProgress], None] = lambda progress: None
    on_done: Callable[[Any], None] = lambda outcome: None
    cancelled: bool = False
    outcome: Any = None
    _finished: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self, outcome: Any) -> None:
        if self._finished.is_set():
            return
        self.outcome = outcome
        self._finished.set()
        self.on_done(outcome)

    def wait(self, timeout: Optional[float] = None) -> Any:
        self._finished.wait(timeout)
        return self.outcome


@dataclass
class _Run:
    job_id: str
    settings: LoraTrainingSettings
    examples: list[TrainingExample]
    control: TrainingControl
    owner: Optional[str] = None
    trainer: Any = None
    started_at: float = field(default_factory=time.perf_counter)
    #: Remove its checkpoints when it ends, whatever the outcome (discarded while running).
    discard: bool = False


class TrainingQueue:
    def __init__(
        self,
        make_trainer: Callable[[LoraTrainingSettings, list[TrainingExample], Path], Any],
        registry: LoraRegistry,
        root: Path,
        checkpoint_every: int = 50,
        hours: Optional[str] = None,
        idle_s: float = 0.0,
        clock: Callable[[], time.struct_time] = time.localtime,
    ):
        """`make_trainer(settings, examples, checkpoint_dir)` builds a `LoraTrainer` (its pipeline
        loaded then). `hours`: "HH:MM-HH:MM" of `clock()` time when training may run; None: any.
        `idle_s`: how long the engine must have been idle before a training step runs."""
        self._make_trainer = make_trainer
        self.registry = registry
        self.root = Path(root)
        self.checkpoint_every = checkpoint_every
        self.hours = hours
        self.idle_s = idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._run: Optional[_Run] = None
        self._paused = False
        self.counts = {"runs": 0, "steps": 0, "pauses": 0, "completed": 0, "failed": 0, "cancelled": 0}

    # -- the caller's side ---------------------------------------------------------------------

    def submit(
        self,
        job_id: str,
        settings: LoraTrainingSettings,
        examples: list[TrainingExample],
        control: TrainingControl,
        owner: Optional[str] = None,
    ) -> None:
        """Start a run; its LoRA will be `owner`'s (the API key's tenant; None: everyone's)."""
        with self._lock:
            if self._run is not None:
                raise OverloadedError(
                    f"this replica is training {self._run.settings.name!r}; retry later", code="overloaded"
                )
            self._run = _Run(job_id, settings, examples, control, owner)
            self.counts["runs"] += 1

    def discard(self, job_id: str) -> None:
        """Remove a job's checkpoints (a cancelled or failed job's); a run of it here is
        cancelled and removes them when it ends."""
        with self._lock:
            if self._run is not None and self._run.job_id == job_id:
                self._run.discard = True
                self._run.control.cancel()
                return
        shutil.rmtree(self._folder(job_id), ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            run = self._run
            return {
                **self.counts,
                "training": None if run is None else run.settings.name,
                "paused": self._paused,
            }

    # -- the engine's side ---------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether `run_step` has work now: a run, inside the hours (a cancelled run is always
        work: it ends at once)."""
        with self._lock:
            run = self._run
        return run is not None and (run.control.cancelled or in_hours(self.hours, self._clock()))

    def pause(self) -> None:
        """The engine is serving while a run waits: its caller hears of it once."""
        with self._lock:
            run = self._run
            if run is None or self._paused or run.trainer is None:
                return
            self._paused = True
            self.counts["pauses"] += 1
        run.control.on_progress(_progress(run.trainer, paused=True))

    def run_step(self) -> None:
        """One unit of work: build the run's trainer (its first call), one optimisation step
        (with a checkpoint every `checkpoint_every`), or end the run."""
        with self._lock:
            run, self._paused = self._run, False
        if run is None:
            return
        try:
            if run.control.cancelled:
                self._end(run, RequestCancelledError("the training job was cancelled", code="cancelled"), "cancelled")
            elif run.trainer is None:
                run.trainer = self._make_trainer(run.settings, run.examples, self._folder(run.job_id))
                if run.trainer.resumed_from:
                    logger.info("training %s resumes at step %d", run.job_id, run.trainer.resumed_from)
            elif not run.trainer.done:
                run.trainer.step()
                self.counts["steps"] += 1
                if run.trainer.step_index % self.checkpoint_every == 0 and not run.trainer.done:
                    run.trainer.checkpoint()
                run.control.on_progress(_progress(run.trainer))
            else:
                self._end(run, self._publish(run), "completed")
        except ServiceError as error:
            self._end(run, error, "failed")
        except Exception as error:  # noqa: BLE001 - one run failing must not stop the engine's loop
            logger.exception("training job %s failed", run.job_id)
            self._end(run, EngineError(f"training failed: {type(error).__name__}: {error}", code="training_failed"), "failed")

    def _publish(self, run: _Run) -> TrainingResult:
        """Write the LoRA beside the registry's files, publish it under its name (409 when the
        name was taken meanwhile), and answer its bytes."""
        trainer = run.trainer
        staged = self.registry.uploads / f".upload-{uuid.uuid4().hex}{SUFFIX}"
        self.registry.uploads.mkdir(parents=True, exist_ok=True)
        trainer.export(staged)
        data = staged.read_bytes()
        self.registry.publish(staged, run.settings.name, run.owner)
        return TrainingResult(
            name=run.settings.name,
            data=data,
            steps=trainer.step_index,
            loss=trainer.loss,
            train_s=round(time.perf_counter() - run.started_at, 3),
            resumed_from=trainer.resumed_from,
        )

    def _end(self, run: _Run, outcome: Any, count: str) -> None:
        with self._lock:
            self._run = None
            self.counts[count] += 1
        run.trainer = None  # its pipeline goes now, not when the next run replaces it
        # A cancelled or failed run keeps its checkpoint: a caller that went away (a restarted job
        # manager) or a retried attempt resumes there; the job manager `discard`s what it gives up.
        if count == "completed" or run.discard:
            shutil.rmtree(self._folder(run.job_id), ignore_errors=True)
        _free_device_memory()
        run.control.finish(outcome)

    def _folder(self, job_id: str) -> Path:
        return self.root / job_id


def in_hours(hours: Optional[str], now: time.struct_time) -> bool:
    """Whether `now` is inside "HH:MM-HH:MM" (the end excluded; a window may wrap midnight)."""
    if hours is None:
        return True
    start, end = ((int(h) * 60 + int(m)) for h, m in (part.split(":") for part in hours.split("-")))
    minute = now.tm_hour * 60 + now.tm_min
    return start <= minute < end if start <= end else (minute >= start or minute < end)


def _progress(trainer: Any, paused: bool = False) -> TrainingProgress:
    eta_s = trainer.eta_s()
    return TrainingProgress(
        step=trainer.step_index, total=trainer.settings.steps, loss=None if trainer.loss is None else round(trainer.loss, 5),
        eta_s=None if eta_s is None else round(eta_s, 1), paused=paused,
    )


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
