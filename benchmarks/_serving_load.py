"""Open-loop HTTP load for ``benchmarks/serving.py``: a fixed request timetable on loopback.

Run as its own process (``python benchmarks/_serving_load.py SPEC.json``, started by
``_serving_driver.drive``), so the client never shares an interpreter (or a GIL) with the
server. The spec names the base URL, the request paths (cycled), the rate and the duration;
the result is one JSON object on stdout. ``percentile`` is shared with the in-process
breakdown (``_serving_breakdown``).

Every request i has a scheduled send time ``t0 + i / rate`` and its latency is measured from
that time, not from when it was actually sent: a server (or client) that falls behind makes
later requests wait, and that wait is counted (no coordinated omission). Requests go out over
a pool of keep-alive HTTP/1.1 connections; a request that finds every connection busy opens
another one, up to ``max_connections``, then queues (its latency still running).

The client speaks minimal HTTP/1.1 over asyncio streams (uvloop when installed) instead of
httpx: on a 2-core machine the client's CPU is taken from the server, and this costs a
fraction of httpx's per-request work. Only stdlib is imported, so the process starts fast.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Tally:
    """What one load run observed."""

    latencies_ms: list[float] = field(default_factory=list)  # successful requests only
    elapsed_ms: list[float] = field(default_factory=list)  # every request, failed ones too
    send_lag_ms: list[float] = field(default_factory=list)  # actual send - scheduled send
    # (scheduled second of the recorded window, elapsed ms) of every recorded request
    by_second: list[tuple[int, float]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # "HTTP 503", "TimeoutError", ...
    sent: int = 0
    ok: int = 0
    first_scheduled: float = 0.0
    last_done: float = 0.0

    def error(self, kind: str) -> None:
        """Count one failed request of this kind."""
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def note(self, elapsed_ms: float, scheduled: float) -> None:
        """One recorded request's elapsed time (failed ones at the time they failed)."""
        self.elapsed_ms.append(elapsed_ms)
        self.by_second.append((int(scheduled - self.first_scheduled), elapsed_ms))

    def timeline(self) -> list[dict[str, float]]:
        """Per second of the window (by scheduled send time): requests, p99 and max ms --
        where in a cold start or a swap the slow requests were."""
        seconds: dict[int, list[float]] = {}
        for second, ms in self.by_second:
            seconds.setdefault(second, []).append(ms)
        return [{"second": s, "requests": len(v), "p99_ms": round(percentile(v, 99), 1),
                 "max_ms": round(max(v), 1)} for s, v in sorted(seconds.items())]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# uvicorn closes a keep-alive connection after 5 s idle; reusing one just as it does fails
# the request (EOF instead of a response), which is the client's fault, not the server's.
MAX_IDLE_S = 4.0


class ConnectionPool:
    """Keep-alive connections to one host; grows on demand up to ``limit``.

    Idle connections are reused least recently used first, so requests rotate over every
    open connection -- and so over every server worker that accepted one, as a proxy's
    upstream pool would spread them; one idle longer than ``MAX_IDLE_S`` (or already closed
    by the server) is closed instead of reused.
    """

    def __init__(self, host: str, port: int, limit: int):
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.open = 0
        self.max_open = 0
        self.freed = asyncio.Condition()

    async def acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The least recently used fresh idle connection, else a new one (waits at the
        limit)."""
        async with self.freed:
            while True:
                now, fresh = time.perf_counter(), []
                for reader, writer, since in self.idle:
                    if now - since > MAX_IDLE_S or reader.at_eof() or writer.is_closing():
                        writer.close()
                        self.open -= 1
                    else:
                        fresh.append((reader, writer, since))
                self.idle = fresh
                if self.idle or self.open < self.limit:
                    break
                await self.freed.wait()
            if self.idle:
                reader, writer, _ = self.idle.pop(0)
                return reader, writer
            self.open += 1
            self.max_open = max(self.max_open, self.open)
        try:
            return await asyncio.open_connection(self.host, self.port)
        except BaseException:
            await self.discard(None)
            raise

    async def release(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        """Return a connection that can be reused."""
        async with self.freed:
            self.idle.append((*conn, time.perf_counter()))
            self.freed.notify()

    async def discard(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
                      ) -> None:
        """Close a connection that cannot be reused (None: one that never opened)."""
        if conn is not None:
            conn[1].close()
        async with self.freed:
            self.open -= 1
            self.freed.notify()

    async def close(self) -> None:
        """Close the idle connections (at the end, when none is in use)."""
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


async def _get(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str,
               path: str) -> tuple[int, bool]:
    """One GET on a keep-alive connection; returns (status, connection reusable)."""
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    else:  # no framing: the body runs to the end of the connection
        await reader.read()
        return status, False
    return status, headers.get("connection") != "close"


async def _one(pool: ConnectionPool, path: str, scheduled: float, timeout: float,
               tally: Tally, record: bool) -> None:
    """One request scheduled at ``scheduled``; counted in ``tally`` unless a warm-up one."""
    conn = None
    try:
        async with asyncio.timeout(timeout):
            conn = await pool.acquire()
            if record:
                tally.send_lag_ms.append((time.perf_counter() - scheduled) * 1e3)
            status, reusable = await _get(conn, pool.host, path)
    except Exception as exc:  # every failure is a counted error, never a crash
        if conn is not None:
            await pool.discard(conn)
        if record:
            tally.error(type(exc).__name__)
            tally.note((time.perf_counter() - scheduled) * 1e3, scheduled)
        return
    done = time.perf_counter()
    if reusable:
        await pool.release(conn)
    else:
        await pool.discard(conn)
    if not record:
        return
    tally.last_done = max(tally.last_done, done)
    tally.note((done - scheduled) * 1e3, scheduled)
    if 200 <= status < 300:
        tally.ok += 1
        tally.latencies_ms.append((done - scheduled) * 1e3)
    else:
        tally.error(f"HTTP {status}")


async def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Send ``rate`` requests per second for ``seconds`` (after ``warmup_seconds`` unrecorded).

    Args:
        spec: {"url", "paths" (cycled), "rate", "seconds", "warmup_seconds",
            "min_connections" (opened before the clock starts), "max_connections",
            "timeout"}.

    Returns:
        {"rate", "seconds", "sent", "ok", "errors", "error_kinds", "p50_ms", "p95_ms",
         "p99_ms", "max_ms" (every request, failed ones at the time they failed),
         "ok_p50_ms", "ok_p99_ms", "mean_ms" (successful ones), "achieved_rps",
         "send_lag_p99_ms", "max_connections_used", "client_cpu_s", "timeline" (per
         second: requests, p99_ms, max_ms)}.
    """
    parts = urlsplit(spec["url"])
    pool = ConnectionPool(parts.hostname or "127.0.0.1", parts.port or 80,
                          int(spec.get("max_connections", 256)))
    rate, paths = float(spec["rate"]), list(spec["paths"])
    timeout = float(spec.get("timeout", 10.0))
    # open a few connections before the clock starts (a proxy keeps a warm upstream pool):
    # with one or two, every request could land on the same server worker
    opened = [await pool.acquire() for _ in range(int(spec.get("min_connections", 8)))]
    for conn in opened:
        await pool.release(conn)
    warm = int(round(rate * float(spec.get("warmup_seconds", 0.0))))
    total = warm + int(round(rate * float(spec["seconds"])))
    tally = Tally()
    tasks = []
    t0 = time.perf_counter() + 0.05
    tally.first_scheduled = t0 + warm / rate
    for i in range(total):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = i >= warm
        tally.sent += record
        tasks.append(asyncio.ensure_future(
            _one(pool, paths[i % len(paths)], scheduled, timeout, tally, record)))
    await asyncio.gather(*tasks)
    await pool.close()
    lat, every = tally.latencies_ms, tally.elapsed_ms
    span = max(tally.last_done - tally.first_scheduled, 1e-9)
    return {
        "rate": rate, "seconds": float(spec["seconds"]), "sent": tally.sent, "ok": tally.ok,
        "errors": sum(tally.errors.values()), "error_kinds": tally.errors,
        # every request, a failed one at the time it failed (a timeout: the timeout)
        "p50_ms": percentile(every, 50), "p95_ms": percentile(every, 95),
        "p99_ms": percentile(every, 99), "max_ms": max(every) if every else math.nan,
        # successful requests only
        "ok_p50_ms": percentile(lat, 50), "ok_p99_ms": percentile(lat, 99),
        "mean_ms": sum(lat) / len(lat) if lat else math.nan,
        "achieved_rps": tally.ok / span if tally.ok else 0.0,
        "send_lag_p99_ms": percentile(tally.send_lag_ms, 99),
        "max_connections_used": pool.max_open,
        "client_cpu_s": time.process_time(),
        "timeline": tally.timeline(),
    }


def main(argv: list[str]) -> int:
    """Run the load described by the JSON file ``argv[1]``; print its result as JSON."""
    spec = json.loads(open(argv[1]).read())  # noqa: SIM115 - read once, tiny file
    try:
        import uvloop  # uvicorn[standard] installs it; the stdlib loop works too
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(run_load(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
