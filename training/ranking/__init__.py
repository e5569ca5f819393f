"""The served model's ranking: candidate sources, the item side, the pair scorer.

What ``/recommend``, ``/search`` and ``/similar`` run. It imports nothing from
``training.evaluation``; the evaluation harness imports it (docs/architecture.md).
"""
