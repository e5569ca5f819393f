"""DAG integrity: the DAG folder parses cleanly, fast, and without heavy imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from core.settings import DAGS_FOLDER

pytestmark = pytest.mark.fast

HEAVY = ("torch", "transformers", "mlflow", "feast", "faiss", "great_expectations", "pandas")


def _parse_in_fresh_process() -> str:
    """Parse the DAG folder in a clean interpreter and report what it imported."""
    code = textwrap.dedent(f"""
        import json, os, sys, time
        os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
        from airflow.dag_processing.dagbag import DagBag
        before = set(sys.modules)
        t = time.perf_counter()
        bag = DagBag(dag_folder={str(DAGS_FOLDER)!r})
        seconds = time.perf_counter() - t
        dags = {{}}
        for dag_id, dag in bag.dags.items():
            dags[dag_id] = {{
                "tags": sorted(dag.tags),
                "retries": [t.retries for t in dag.tasks],
                # an asset-triggered timetable has no summary
                "schedule": str(getattr(dag.timetable, "summary", type(dag.timetable).__name__)),
                "catchup": dag.catchup,
                "tasks": [t.task_id for t in dag.tasks],
                "doc": bool(dag.doc_md),
            }}
        heavy = sorted(m for m in {HEAVY!r} if m in set(sys.modules) - before)
        print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}},
                           "dags": dags, "heavy": heavy, "seconds": seconds}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin",
                                          "AIRFLOW_HOME": "/tmp/shoprec-dagbag-test"})
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def parsed() -> dict:
    import json

    return json.loads(_parse_in_fresh_process())


def test_no_import_errors(parsed: dict) -> None:
    assert parsed["errors"] == {}
    assert "shoprec_daily" in parsed["dags"]


def test_every_dag_has_tags_docs_and_retries(parsed: dict) -> None:
    for dag_id, dag in parsed["dags"].items():
        assert dag["tags"], f"{dag_id} has no tags"
        assert dag["doc"], f"{dag_id} has no doc_md"
        assert min(dag["retries"]) >= 2, f"{dag_id} has tasks with retries < 2"


def test_no_heavy_imports_at_parse_time(parsed: dict) -> None:
    assert parsed["heavy"] == [], f"DAG parsing imported {parsed['heavy']}"


def test_daily_pipeline_shape(parsed: dict) -> None:
    dag = parsed["dags"]["shoprec_daily"]
    assert dag["catchup"] is False
    assert dag["tasks"] == ["validate", "build_features", "materialize", "user_vectors",
                            "train", "evaluate", "register", "build_index", "promote",
                            "reload_serving"]


def test_index_consumer_is_data_aware(parsed: dict) -> None:
    consumer = parsed["dags"]["shoprec_index_published"]
    assert consumer["schedule"] == "AssetTriggeredTimetable"
