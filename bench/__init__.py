"""Benchmarks (run as scripts: `python bench/<name>.py`); `bench.common` holds what they share."""
