"""cmfast's benchmarks: measurements, never tests. `python -m bench --help` lists the suites."""
