"""Benchmark scripts (run as ``python benchmarks/<name>.py``); importable for their correctness checks."""
