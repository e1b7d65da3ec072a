"""Where independent work runs: in this process, in a local process pool, or on a Ray cluster.

The pipeline hands independent tasks (one weight's error table, one
weight's gptq/adaround rounding, one block's or one plan's evaluations in
ONNX Runtime) to an :class:`Executor` and reads the results back in
submission order, so the output does not depend on where or in which order
the tasks ran. Tasks are module-level functions with picklable arguments; a
weight travels as its TensorProto, which for models with external data is
only a reference to the data file (each worker reads its own tensor from
disk, so workers must see the same file system).

Items are submitted a few at a time ahead of the results being read
(:attr:`Executor.window`), so a generator of large tasks (plan models,
blocks with their activations) never holds them all at once.
"""

from __future__ import annotations

import enum
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _PoolExecutor
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class ExecutorKind(enum.Enum):
    LOCAL = "local"
    RAY = "ray"


@dataclass(frozen=True)
class ExecutionOptions:
    """How to run per-tensor work: ``jobs`` local processes (1: threads in this process), or Ray.

    ``ray_address`` (default: the ``RAY_ADDRESS`` environment variable, else
    a Ray instance started on this machine) is passed to ``ray.init``.
    """

    kind: ExecutorKind = ExecutorKind.LOCAL
    jobs: int = 1
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ConfigError(f"the number of jobs must be at least 1, got {self.jobs}")
        if self.ray_address is not None and self.kind is not ExecutorKind.RAY:
            raise ConfigError("a Ray address needs the Ray executor")


class Executor:
    """Runs ``fn`` over items and yields the results in the items' order."""

    #: Whether tasks run in other processes (their arguments are pickled), rather than on threads of this one.
    remote: bool = False
    #: How many tasks run at once.
    workers: int = 1

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def window(self) -> int:
        """Tasks submitted ahead of the one whose result is awaited."""
        return 2 * self.workers

    def close(self) -> None:
        """Release workers; the executor cannot be used afterwards."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PoolExecutor(Executor):
    """A concurrent.futures pool: threads in this process (numpy releases the GIL) or worker processes."""

    def __init__(self, pool: _PoolExecutor, workers: int, remote: bool) -> None:
        self._pool = pool
        self.workers = workers
        self.remote = remote

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(self._pool.submit(fn, item))
            if len(pending) > self.window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def threads(workers: int | None = None) -> PoolExecutor:
    """Threads in this process: the default (min(4, cores) threads)."""
    n = workers or min(4, os.cpu_count() or 1)
    return PoolExecutor(ThreadPoolExecutor(max_workers=n), n, remote=False)


class InlineExecutor(Executor):
    """Each task in turn, in the calling thread: for work that is parallel inside already (an ONNX Runtime run)."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        for item in items:
            yield fn(item)


def inline() -> InlineExecutor:
    return InlineExecutor()


def for_runtime(executor: Executor | None) -> Executor:
    """Where ONNX Runtime evaluations run: on ``executor`` when its workers are processes, else one at a time here.

    One ONNX Runtime run already uses every core of this process, so threads
    would only take turns; worker processes (``--jobs N``, Ray) each run
    their own sessions, with their share of the cores.
    """
    return executor if executor is not None and executor.remote else inline()


def ort_threads(executor: Executor) -> int:
    """ONNX Runtime's intra-op threads for a task on ``executor``: 0 (its default: every core) unless workers share them."""
    if isinstance(executor, RayExecutor):  # a Ray task holds one CPU
        return 1
    return max(1, (os.cpu_count() or 1) // executor.workers) if executor.remote else 0


def processes(jobs: int) -> PoolExecutor:
    """``jobs`` worker processes, started fresh (spawn), so no lock or ORT thread pool is inherited."""
    import multiprocessing

    return PoolExecutor(ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")), jobs,
                        remote=True)


class RayExecutor(Executor):
    """Tasks on a Ray cluster (``ray.init(address=...)``); needs the ``[ray]`` extra."""

    remote = True

    def __init__(self, address: str | None = None) -> None:
        ray = require_ray()
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            where = address or os.environ.get("RAY_ADDRESS") or None
            log.info("connecting to Ray at %s", where or "a new local instance")
            try:
                ray.init(address=where, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}})
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot connect to Ray at {where or 'a new local instance'} ({exc}); check "
                                  "the address or start a cluster with 'ray start --head'") from exc
        self._remote: dict[Callable[..., Any], Any] = {}
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        task = self._remote.get(fn)
        if task is None:
            task = self._remote[fn] = self._ray.remote(fn)
        pending: deque[Any] = deque()
        for item in items:
            pending.append(task.remote(item))
            if len(pending) > self.window:
                yield self._ray.get(pending.popleft())
        while pending:
            yield self._ray.get(pending.popleft())

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


def require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("the Ray executor needs Ray: pip install 'mixq-onnx[ray]'") from exc
    return ray


def make_executor(options: ExecutionOptions) -> Executor:
    """The executor ``options`` describe (threads for one job)."""
    if options.kind is ExecutorKind.RAY:
        return RayExecutor(options.ray_address)
    return processes(options.jobs) if options.jobs > 1 else threads()


__all__ = ["ExecutionOptions", "Executor", "ExecutorKind", "InlineExecutor", "RayExecutor", "for_runtime", "inline",
           "make_executor", "ort_threads", "processes", "threads"]
