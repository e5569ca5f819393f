"""The suite's tiers: a test in no tier (or in two) fails collection, and the tier runner
stops at the first tier that fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

TESTS = Path(__file__).resolve().parents[1]


def test_a_test_in_no_tier_fails_collection(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_forgotten():\n    pass\n")
    result = pytester.runpytest("-p", "tiers")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*every test belongs to exactly one tier*",
                                 "*test_plain.py::test_forgotten: no tier*"])


def test_a_test_in_two_tiers_fails_collection(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_both="""
        import pytest

        pytestmark = pytest.mark.fast

        @pytest.mark.operations
        def test_greedy():
            pass
    """)
    result = pytester.runpytest("-p", "tiers")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_both.py::test_greedy: fast, operations*"])


def test_one_tier_each_collects_and_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ok="""
        import pytest

        @pytest.mark.fast
        def test_quick():
            pass

        @pytest.mark.integration
        def test_chain():
            pass
    """)
    result = pytester.runpytest("-p", "tiers", "-m", "fast")
    result.assert_outcomes(passed=1, deselected=1)


def test_the_runner_stops_at_the_first_failing_tier(tmp_path: Path) -> None:
    (tmp_path / "test_tiers_demo.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.fast\ndef test_fast_ok():\n    pass\n\n"
        "@pytest.mark.integration\ndef test_integration_broken():\n    assert False\n\n"
        "@pytest.mark.operations\ndef test_operations_never_reached():\n    pass\n")
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "SHOPREC_TEST_WORKERS": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, str(TESTS / "run_tiers.py"), "--", "-p", "tiers", "-p",
         "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "===== tier fast =====" in done.stdout
    assert "tier fast: 1 passed" in done.stdout
    assert "tier integration failed" in done.stdout
    assert "===== tier operations =====" not in done.stdout
    assert done.stdout.rstrip().splitlines()[-1] == "tests: 1 passed, 1 failed, 0 skipped"
