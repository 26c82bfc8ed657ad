"""Benchmarks: `make bench` (or `.venv/bin/python -m bench --help`). Not part of the test suite."""
