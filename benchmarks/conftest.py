"""Benchmarks (pytest-benchmark): run with `python -m pytest benchmarks --benchmark-only`; not part of CI."""
