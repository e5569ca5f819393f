"""The evaluation harness: the protocol, its metrics and reports, the baselines, the research
blends and the learned models as protocol methods.

It may import the served model (``training`` and ``training.ranking``); nothing the server
runs imports it (docs/architecture.md).
"""
