"""The bundle as an MLflow pyfunc model: the registry shows a real, loadable model.

``mlflow.pyfunc.load_model("models:/shoprec-two-tower@champion").predict(df)`` takes a frame
with a ``recent_product_ids`` column (list of product ids, most recent last) and returns the
top-k product ids and scores by exact search; the HTTP server uses the FAISS index instead.
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
        from serving.bundle import EMBEDDINGS, MODEL_DIR, PRODUCTS, verify
        from training.checkpoint import load_model

        folder = Path(context.artifacts["bundle"])
        verify(folder)
        self.model, _ = load_model(folder / MODEL_DIR)
        self.embeddings = np.load(folder / EMBEDDINGS)  # (N, D)
        self.product_ids = pd.read_parquet(folder / PRODUCTS)["product_id"].tolist()
        self.row = {p: i for i, p in enumerate(self.product_ids)}

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        from training.towers import encode_users

        k = int((params or {}).get("k", DEFAULT_K))
        histories = [list(h) if h is not None else [] for h in model_input["recent_product_ids"]]
        users = encode_users(self.model, histories, None, self.row, self.embeddings)  # (U, D)
        scores = users @ self.embeddings.T  # (U, N)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (U, k)
        return pd.DataFrame({
            "product_ids": [[self.product_ids[j] for j in row] for row in top],
            "scores": [[float(scores[i, j]) for j in row] for i, row in enumerate(top)],
        })


def log_pyfunc(bundle: Path, sample_history: list[str]) -> Any:
    """Log the bundle as the active run's model, with signature and input example."""
    from mlflow.models import infer_signature

    example = pd.DataFrame({"recent_product_ids": [sample_history[-5:]]})
    output = pd.DataFrame({"product_ids": [["P1"]], "scores": [[1.0]]})
    signature = infer_signature(example, output, params={"k": DEFAULT_K})
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=TwoTowerRecommender(),
        artifacts={"bundle": str(bundle)},
        signature=signature,
        input_example=example,
        pip_requirements=["shoprec"],
    )
