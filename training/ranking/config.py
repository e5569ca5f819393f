"""The served ranking's hyper-parameters and the names of the features it reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from features.user_state import HISTORY_LEN

SOURCE_NAMES = ("two_tower", "text_cosine", "co_occurrence", "als", "sequence")
FACT_NAMES = ("own", "log_count", "log_count_30d", "recency_30d", "recency_180d",
              "repurchase_rate", "own_x_repurchase_rate", "popularity_7d", "popularity_30d",
              "trend", "newness", "user_occasions", "own_x_user_occasions")


# The ranking stage's richer features (``Scorer.features``): how often the history shows the
# candidate at all and in carts or purchases, the share of the history in its category, its
# log price against the history's median, how close the time since the user's last purchase
# of it is to its repurchase cycle, its co-occurrence with the last basket, and each
# source's rank among the user's candidates (1 / log2(2 + rank)).
CONTEXT_NAMES = ("log_seen", "log_interacted", "category_share", "price_vs_user", "due",
                 "last_basket", *(f"{s}_rank" for s in SOURCE_NAMES))

FEATURE_NAMES = (*SOURCE_NAMES, *FACT_NAMES, *CONTEXT_NAMES)
# what bundles trained before the richer features read (their pair scorers' inputs)
LEGACY_FEATURE_NAMES = (*SOURCE_NAMES[:4], *FACT_NAMES)


@dataclass(frozen=True)
class ScorerConfig:
    """Hyper-parameters of the served ranking (logged with the run's params).

    Attributes:
        history_len: events per user the scorer reads (Feast's ``HISTORY_LEN``).
        neighbours: co-occurrence neighbours kept per product.
        als_factors, als_regularization, als_alpha, als_iterations: the ALS item side.
        repurchase_prior: smoothing (pseudo-buyers) of the repurchase rate.
        hidden: width of the pair scorer's hidden layer.
        epochs: pair-scorer passes over the validation users.
        max_users: at most this many validation users (a seeded sample) per setting.
        seed: sampling and initialisation seed.
        candidates: candidates per dense source (two-tower, text, ALS) and user.
        neighbour_candidates: co-occurrence candidates per user (the strongest).
        popular_candidates: the most popular products over 30 and over 7 days, each.
        min_candidates: candidate lists shorter than this (a narrow category, an unknown
            user) are topped up by popularity.
        stage: what ranks the candidates (``training.ranking.ltr``): "auto" (chosen per
            setting on held-out validation users), or "mlp" (the pair scorer), "trees"
            (lambdarank) or "blend" (both) for every setting.
        context: read the richer features of the user's own history (``CONTEXT_NAMES``);
            False trains on the 17 before them (an ablation).
        sequence: fit the sequence encoder (``training.ranking.sequence``) with the item
            side, a candidate source and features; False leaves it out (an ablation).
        sequence_dim, sequence_len, sequence_layers, sequence_heads: its width, the history
            entries it reads, its transformer layers and attention heads.
        sequence_epochs, sequence_steps, sequence_lr, sequence_users, sequence_negatives:
            its training: passes, at most this many steps of 128 windows (~0.15 s each on
            2 CPU cores), Adam's learning rate, at most this many buyers (a seeded sample),
            and products sampled for each step's softmax.
    """

    history_len: int = HISTORY_LEN
    neighbours: int = 100
    als_factors: int = 64
    als_regularization: float = 0.05
    als_alpha: float = 5.0
    als_iterations: int = 15
    repurchase_prior: float = 5.0
    hidden: int = 32
    epochs: int = 20
    max_users: int = 2000
    seed: int = 0
    candidates: int = 200
    neighbour_candidates: int = 300
    popular_candidates: int = 100
    min_candidates: int = 100
    stage: str = "auto"
    context: bool = True
    sequence: bool = True
    sequence_dim: int = 64
    sequence_len: int = 30
    sequence_layers: int = 2
    sequence_heads: int = 2
    sequence_epochs: int = 6
    sequence_steps: int = 500
    sequence_lr: float = 5e-3
    sequence_users: int = 20_000
    sequence_negatives: int = 1024

    def to_params(self) -> dict[str, Any]:
        return {f"scorer.{k}": v for k, v in asdict(self).items()}
