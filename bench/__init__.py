"""Benchmark runners; each prints the table that BENCHMARKS.md quotes, with the command."""
