"""Benchmarks of alit_fast: a pytest-benchmark suite (``pytest benchmarks/``) and a one-shot GPU
run (``python -m benchmarks.gpu_suite --out DIR``) that share the case definitions in
``benchmarks.cases``. See benchmarks/RESULTS.md for how to run them and what they found.
"""
from ._env import prepare

prepare()
