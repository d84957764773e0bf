"""Helpers for tests, examples and benchmarks: tiny random checkpoints, an oracle drafter, the benchmark commands.

Not part of the generation backend; nothing in ``mlx_lm_dspark`` imports it.
"""
