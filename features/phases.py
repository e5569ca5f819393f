"""Wall seconds per named phase of a piece of work, for its log line."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Phases:
    """Wall seconds per named phase of a build, for its log line."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def __str__(self) -> str:
        return ", ".join(f"{name} {s:.2f}" for name, s in self.seconds.items())
