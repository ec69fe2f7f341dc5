"""mixerzoo against its peers with pytest-benchmark: `pytest benchmarks/ --benchmark-only` (see cases.py)."""
