"""The benchmark harness: `python3 tasks.py bench` (see bench/README.md)."""
