"""Benchmarks (pytest-benchmark): run with `python -m pytest benchmarks --benchmark-only`; not part of CI.

The process is set up as `cli.py` sets up its own: glibc keeps large freed blocks (`harness.allocator`).
"""

from harness.allocator import keep_large_blocks

keep_large_blocks()
