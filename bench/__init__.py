"""Benchmarks: each `bench/bench_*.py` has `main() -> None` and prints its results as Markdown."""
