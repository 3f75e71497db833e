"""Benchmarks and load generators for vqa-serve (see docs/performance.md)."""
