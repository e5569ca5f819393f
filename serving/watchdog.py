"""A serving process's event-loop watchdog: says when, how long and where the loop stalled.

Every request of a worker runs on one event loop; anything that keeps it from running -- a
blocking call on the loop, or another thread holding the GIL (a bundle load, the collector)
-- delays every request of that worker at once, and shows up only as a p99 nobody can
explain. A task on the loop beats every ``interval`` seconds; a thread checks the beat, and
when the loop has not run for ``threshold`` seconds it logs a warning with where each
thread of the process is (the loop thread's stack first), once per stall, and again with the
stall's length when the loop runs again. ``stalls`` counts them for ``/metrics``. Garbage
collections that take half the threshold or more are logged too (their generation and
length): the collector holds the GIL for all of it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

THRESHOLD = 0.25  # seconds without a beat that count as a stall


PROJECT = str(Path(__file__).resolve().parents[1])


def where(frame, limit: int = 4) -> str:  # noqa: ANN001
    """The innermost ``limit`` frames, then the innermost two of this project's code (what
    of ours led there) when they are not among them."""
    stack = traceback.extract_stack(frame)
    shown = stack[-limit:]
    ours = [f for f in stack[:-limit] if f.filename.startswith(PROJECT)
            and "site-packages" not in f.filename][-2:]
    text = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(shown))
    if ours:
        text += " << " + " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                    for f in reversed(ours))
    return text


class LoopWatchdog:
    """Watch the running event loop (``start`` from inside it; ``stop`` at shutdown)."""

    def __init__(self, threshold: float = THRESHOLD, interval: float = 0.05):
        self.threshold, self.interval = threshold, interval
        self.stalls = 0
        self.gc_pauses = 0  # collections that took threshold / 2 or more (logged)
        self.longest = 0.0
        self._gc_started = 0.0
        self._beat = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None

    def _gc_timer(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        if took >= self.threshold / 2:
            self.gc_pauses += 1
            log.warning("garbage collection of generation %s took %.0f ms (%s collected)",
                        info.get("generation"), took * 1e3, info.get("collected"))

    def start(self) -> None:
        import gc

        if self._gc_timer not in gc.callbacks:
            gc.callbacks.append(self._gc_timer)
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._beating())
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        import gc

        if self._gc_timer in gc.callbacks:
            gc.callbacks.remove(self._gc_timer)
        self._stop.set()
        if self._task is not None:
            self._task.cancel()

    async def _beating(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(self.interval)

    def _watch(self) -> None:
        stalled_since: float | None = None
        while not self._stop.wait(self.interval):
            beat = self._beat
            late = time.monotonic() - beat
            if stalled_since is None and late >= self.threshold:
                stalled_since = beat
                self.stalls += 1
                log.warning("event loop stalled for %.0f ms so far; %s", late * 1e3,
                            self._threads())
            elif stalled_since is not None and beat > stalled_since:
                length = beat - stalled_since
                self.longest = max(self.longest, length)
                log.warning("event loop ran again after a %.0f ms stall", length * 1e3)
                stalled_since = None

    def _threads(self) -> str:
        frames = sys._current_frames()
        names = {t.ident: t.name for t in threading.enumerate()}
        order = sorted(frames, key=lambda ident: ident != self._loop_thread)
        return "; ".join(
            f"[{'event loop' if ident == self._loop_thread else names.get(ident, ident)}] "
            f"{where(frames[ident])}"
            for ident in order if ident != threading.get_ident())
