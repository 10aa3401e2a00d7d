"""Benchmarks: speed and memory, measured, never asserted in tests. Results go to docs/BENCHMARKS.md."""
