"""Run the suite tier by tier (fast, integration, operations) and stop at the first tier
that fails, so a broken basic fails CI in minutes, not at minute 40.

Usage: ``python tests/run_tiers.py [TIER ...] [-- PYTEST_ARGS ...]`` (``make test`` runs every
tier; ``make test PYTEST_ARGS='-k backfill'`` passes arguments to each pytest run). Prints
each tier's wall time and, last, one line with the totals of every tier that ran.

Each tier runs on pytest-xdist workers: 2 for the fast and integration tiers (one per core
of the CI machine: one pytest process keeps one core busy), 3 for the operations tier (it
mostly waits on Airflow's schedulers and task processes: the machine's load stays near 1
with one worker). ``SHOPREC_TEST_WORKERS`` sets one count for every tier (1 runs
in-process). ``--dist loadscope`` sends each module (or class) to one worker whole, so a
module-built state (a Feast shop, the backfill policy shop, the production stack) is built
once. (``loadgroup`` would be finer, but pytest-xdist 3.8 cannot group under pytest 9: it
renames a private attribute pytest no longer reads.)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiers import TIERS  # noqa: E402

NO_TESTS_COLLECTED = 5  # pytest's exit code when a filter leaves a tier empty


WORKERS = {"fast": 2, "integration": 2, "operations": 3}


def worker_args(tier: str) -> list[str]:
    """pytest-xdist arguments for ``tier`` ($SHOPREC_TEST_WORKERS, else ``WORKERS``)."""
    import os

    count = int(os.environ.get("SHOPREC_TEST_WORKERS") or WORKERS[tier])
    return ["-n", str(count), "--dist", "loadscope"] if count > 1 else []


def _counts(report: Path) -> dict[str, int]:
    """passed/failed/skipped from a JUnit XML report (errors count as failed)."""
    if not report.exists():
        return {"passed": 0, "failed": 0, "skipped": 0}
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(
        suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        chosen, extra = argv[:split], argv[split + 1:]
    else:
        chosen, extra = [a for a in argv if a in TIERS], [a for a in argv if a not in TIERS]
    tiers = [t for t in TIERS if t in chosen] or list(TIERS)
    unknown = [t for t in chosen if t not in TIERS]
    if unknown:
        print(f"unknown tier(s) {unknown}; the tiers are {', '.join(TIERS)}", file=sys.stderr)
        return 2
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    timings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="shoprec-tiers-") as folder:
        for tier in tiers:
            report = Path(folder) / f"{tier}.xml"
            print(f"\n===== tier {tier} =====", flush=True)
            started = time.monotonic()
            code = subprocess.call([sys.executable, "-m", "pytest", "-m", tier,
                                    f"--junitxml={report}", *worker_args(tier), *extra])
            seconds = time.monotonic() - started
            counts = _counts(report)
            for key in totals:
                totals[key] += counts[key]
            timings.append(f"{tier} {seconds:.0f} s")
            if code not in (0, NO_TESTS_COLLECTED):
                print(f"\ntier {tier} failed (pytest exit {code}) after {seconds:.0f} s; "
                      f"later tiers not run. Tiers: {'; '.join(timings)}", flush=True)
                print(f"tests: {totals['passed']} passed, {max(totals['failed'], 1)} failed, "
                      f"{totals['skipped']} skipped")
                return code
            print(f"tier {tier}: {counts['passed']} passed, {counts['skipped']} skipped in "
                  f"{seconds:.0f} s", flush=True)
    print(f"\ntiers: {'; '.join(timings)}")
    print(f"tests: {totals['passed']} passed, {totals['failed']} failed, "
          f"{totals['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
