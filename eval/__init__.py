"""Evaluation tooling for sglang-kvc: LongBench v1/v2, a RULER-style suite and a shared-context suite.

Plain scripts folder, run from the repository root (`python -m eval.longbench ...`); see eval/README.md.
"""
