"""The benchmark entry point: `python -m bench SUITE [options]`; see `python -m bench --help`."""

from .cli import main

main()
