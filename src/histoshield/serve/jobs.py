"""A bounded job queue: fixed worker threads, a cap on queued + running jobs (excess → Busy),
progress, cancellation and a wall-clock deadline checked inside the model's forward pass."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from histoshield.errors import HistoshieldError


class Busy(Exception):
    """The queue is full: the request should be answered 429 (retry later)."""


class Cancelled(HistoshieldError):
    """A job stopped because its client cancelled it."""

    status = 409


class TimedOut(HistoshieldError):
    """A job stopped at the server's wall-clock limit."""

    status = 503


class Job:
    """One unit of work: status, progress in [0, 1], a cancel flag and a deadline."""

    def __init__(self, kind: str, deadline_s: float) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.kind = kind
        self.status = "queued"  # queued | running | done | failed | cancelled
        self.progress = 0.0
        self.error: str | None = None
        self.result: Any = None
        self.created = time.time()
        self.deadline_s = float(deadline_s)
        self.started: float | None = None
        self.cancel_event = threading.Event()
        self.future: Future | None = None

    def check(self) -> None:
        """Raise Cancelled / TimedOut when the job should stop (called between model passes)."""
        if self.cancel_event.is_set():
            raise Cancelled("cancelled by the client")
        if self.started is not None and time.time() - self.started > self.deadline_s:
            raise TimedOut(
                f"stopped after the server's {self.deadline_s:g} s limit per job: lower steps, "
                "queries or n"
            )

    def to_dict(self, *, with_result: bool = True) -> dict[str, Any]:
        """The job as the API reports it."""
        d = {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": round(self.progress, 4),
            "error": self.error,
        }
        if with_result and self.status == "done":
            d["result"] = self.result
        return d


class JobQueue:
    """`workers` threads; at most `max_pending` jobs queued or running, the rest refused."""

    def __init__(self, name: str, *, workers: int, max_pending: int, keep: int = 64) -> None:
        if workers < 1 or max_pending < workers:
            raise ValueError("need workers >= 1 and max_pending >= workers")
        self.name = name
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"hs-{name}")
        self._lock = threading.Lock()
        self._pending = 0
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep

    @property
    def pending(self) -> int:
        """Jobs queued or running now."""
        return self._pending

    def submit(self, kind: str, fn: Callable[[Job], Any], *, deadline_s: float) -> Job:
        """Queue `fn(job)`; raises Busy when `max_pending` jobs are already waiting or running."""
        job = Job(kind, deadline_s)
        with self._lock:
            if self._pending >= self.max_pending:
                raise Busy(f"the {self.name} queue is full ({self.max_pending} jobs): retry later")
            self._pending += 1
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:  # forget the oldest finished jobs
                old = next((k for k, j in self._jobs.items() if j.future and j.future.done()), None)
                if old is None:
                    break
                del self._jobs[old]
        job.future = self._pool.submit(self._run, job, fn)
        return job

    def get(self, job_id: str) -> Job | None:
        """A job by id (recent ones only)."""
        return self._jobs.get(job_id)

    def _run(self, job: Job, fn: Callable[[Job], Any]) -> Any:
        try:
            if job.cancel_event.is_set():
                job.status = "cancelled"
                job.error = "cancelled before it started"
                raise Cancelled(job.error)
            job.status, job.started = "running", time.time()
            result = fn(job)
            job.result, job.progress, job.status = result, 1.0, "done"
            return result
        except Cancelled as e:
            job.status, job.error = "cancelled", str(e)
            raise
        except BaseException as e:
            job.status = "failed"
            job.error = str(e) if isinstance(e, HistoshieldError) else "internal error"
            raise
        finally:
            with self._lock:
                self._pending -= 1

    def shutdown(self) -> None:
        """Cancel queued jobs and stop the workers."""
        for job in list(self._jobs.values()):
            job.cancel_event.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


class Watched(nn.Module):
    """A model seen through a job: every forward pass counts towards progress and first checks
    the job's cancel flag and deadline, so any registry attack can be cancelled mid-run
    without changes to the attack itself."""

    def __init__(self, model: nn.Module, job: Job, expected_passes: int) -> None:
        super().__init__()
        self.inner = model
        self.job = job
        self.expected = max(1, int(expected_passes))
        self.passes = 0
        # what attacks read from the model they are given
        self.classes = getattr(model, "classes", None)
        self.default_eot = getattr(model, "default_eot", 1)
        self.image_size = getattr(model, "image_size", None)
        # eval like the model it wraps: predict_proba restores `training` afterwards, and a
        # wrapper left in training mode would switch the shared model into training mode too
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inner model's logits, after the job's cancel / deadline check."""
        self.job.check()
        self.passes += 1
        # an estimate: attacks that stop early or run extra components finish off the scale
        self.job.progress = min(0.99, self.passes / self.expected)
        return self.inner(x)
