"""CPU and wall seconds per phase of a conversion, summed over the threads that do the work.

On a shared machine wall time says more about the neighbours than about the converter; the CPU time a thread spent
in each phase (``time.thread_time``) does not. The bench (``bench/bench_convert.py --phases``) prints these, so a
regression shows up as the phase that grew.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class PhaseClock:
    """Accumulates ``{phase: seconds}`` of thread CPU and of wall; phases must not nest within one thread."""

    def __init__(self) -> None:
        self.cpu: Counter[str] = Counter()
        self.wall: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            with self._lock:
                self.cpu[name] += cpu
                self.wall[name] += wall

    def timed(self, name: str, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` counted under ``name`` (for work handed to another thread)."""
        with self.phase(name):
            return function(*args)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{phase: {"cpu": s, "wall": s}}``, largest CPU first."""
        return {
            name: {"cpu": round(self.cpu[name], 3), "wall": round(self.wall[name], 3)}
            for name, _ in self.cpu.most_common()
        }
