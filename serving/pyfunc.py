"""The bundle as an MLflow pyfunc model: the registry shows a real, loadable model.

``mlflow.pyfunc.load_model("models:/shoprec-two-tower@champion").predict(df)`` takes a frame
with a ``recent_product_ids`` column (list of product ids, most recent last) and, optionally,
``recent_event_types`` and ``recent_timestamps`` (epoch seconds) aligned with it, as Feast's
``user_recent_products`` holds them, and returns the served ranking's top-k product ids and
scores (params: ``k``, ``exclude_purchased``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

DEFAULT_K = 10


class TwoTowerRecommender(mlflow.pyfunc.PythonModel):
    """Recommends products for user histories with a shoprec bundle."""

    def load_context(self, context: Any) -> None:
        from serving.bundle import MODEL_DIR, PRODUCTS, SCORER_DIR, verify
        from training.checkpoint import load_model
        from training.ranking.scorer import Scorer

        folder = Path(context.artifacts["bundle"])
        verify(folder)
        model, config = load_model(folder / MODEL_DIR)
        self.scorer = Scorer.load(folder / SCORER_DIR, model, config)
        self.product_ids = pd.read_parquet(folder / PRODUCTS)["product_id"].tolist()

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        from training.metrics import top_k
        from training.ranking.histories import Histories

        params = params or {}
        k = int(params.get("k", DEFAULT_K))
        frame = model_input.copy()
        n = len(frame)
        products = [list(h) if h is not None else [] for h in frame["recent_product_ids"]]
        frame["recent_product_ids"] = products
        if "recent_event_types" not in frame:
            frame["recent_event_types"] = [["purchase"] * len(p) for p in products]
        histories = Histories.from_feast(frame)
        now = max([self.scorer.state.cut.timestamp(),
                   *(float(np.nanmax(t)) for t in histories.timestamps
                     if np.isfinite(t).any())])
        scores = self.scorer.scores(histories, now,
                                    exclude_purchased=bool(params.get("exclude_purchased")))
        top = top_k(scores, k)  # (U, k)
        return pd.DataFrame({
            "product_ids": [[self.product_ids[j] for j in row if np.isfinite(scores[i, j])]
                            for i, row in enumerate(top)],
            "scores": [[float(scores[i, j]) for j in row if np.isfinite(scores[i, j])]
                       for i, row in enumerate(top)],
        }, index=range(n))


def log_pyfunc(bundle: Path, sample_history: list[str],
               sample_types: list[str] | None = None,
               sample_timestamps: list[int] | None = None) -> Any:
    """Log the bundle as the active run's model, with signature and input example.

    The signature's inputs: ``recent_product_ids`` (required), ``recent_event_types`` and
    ``recent_timestamps`` (optional); params ``k`` and ``exclude_purchased``.
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    n = len(sample_history[-5:])
    example = pd.DataFrame({
        "recent_product_ids": [sample_history[-5:]],
        "recent_event_types": [(sample_types or ["purchase"] * n)[-n:]],
        "recent_timestamps": [[int(t) for t in (sample_timestamps or [0] * n)[-n:]]],
    })
    output = pd.DataFrame({"product_ids": [["P1"]], "scores": [[1.0]]})
    inferred = infer_signature(example, output,
                               params={"k": DEFAULT_K, "exclude_purchased": False})
    inputs = Schema([ColSpec(c.type, c.name, required=c.name == "recent_product_ids")
                     for c in inferred.inputs.inputs])
    signature = ModelSignature(inputs, inferred.outputs, inferred.params)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=TwoTowerRecommender(),
        artifacts={"bundle": str(bundle)},
        signature=signature,
        input_example=example,
        pip_requirements=["shoprec"],
    )
