"""Benchmarks and profiles of the inference path (bench/README.md lists them and their results)."""
