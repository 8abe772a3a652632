"""Benchmarks: `python -m benchmarks.NAME` prints one JSON line; figures are kept in benchmarks/RESULTS.md."""
