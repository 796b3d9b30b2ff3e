"""Benchmarks behind `medfm bench`: clicks, propagation, remote."""
