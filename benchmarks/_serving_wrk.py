"""The fixed-rate figures confirmed with wrk (Debian's ``wrk`` package), a compiled load
generator that costs the server's cores little.

wrk is closed-loop (each connection sends its next request when the last one is answered), so
it measures what the server sustains with a few requests in flight, not the p99 at a fixed rate
(the open-loop driver, ``_serving_load.py``, does that). Each endpoint's request paths (the same
users, products and queries as the driver's) are replayed from a file by a small Lua script.
Reported per endpoint: requests/s, latency p50/p99 as wrk measures them, errors, the server's
CPU per request and wrk's own CPU.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

LUA = r"""
local paths = {}
for line in io.lines(os.getenv("SHOPREC_WRK_PATHS")) do paths[#paths + 1] = line end
local counter = 0
setup = function(thread) thread:set("offset", math.random(#paths)) end
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[((counter + (offset or 0)) % #paths) + 1])
end
"""

UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def available() -> bool:
    return shutil.which("wrk") is not None


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * UNITS_MS[unit]


def run(server: Any, paths: list[str], seconds: float = 10.0, connections: int = 8
        ) -> dict[str, Any]:
    """wrk with ``connections`` connections on one thread for ``seconds`` over ``paths``."""
    with tempfile.TemporaryDirectory(prefix="shoprec-wrk-") as tmp:
        script, listing = Path(tmp) / "paths.lua", Path(tmp) / "paths.txt"
        script.write_text(LUA)
        listing.write_text("\n".join(paths) + "\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = server.cpu_seconds()
        started = time.perf_counter()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency",
             "--timeout", "10s", "-s", str(script), server.url],
            check=True, capture_output=True, text=True,
            env={"SHOPREC_WRK_PATHS": str(listing), "PATH": "/usr/bin:/bin"}).stdout
        wall = time.perf_counter() - started
        cpu = server.cpu_seconds() - cpu
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, flags=re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"connections": connections, "seconds": wall, "requests": requests,
            "rps": requests / wall, "p50_ms": _ms(latency["50"]), "p99_ms": _ms(latency["99"]),
            "errors": errors + (int(non_2xx.group(1)) if non_2xx else 0),
            "server_cpu_ms_per_req": cpu / max(requests, 1) * 1e3,
            "wrk_cores": wrk_cpu / wall}
