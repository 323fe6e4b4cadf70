"""The `cmfast` command line. Each module registers its commands, each with its handler:

- `sample`: sample, info, export;
- `train`: train-edm, distill, train-ct, demo;
- `edit`: edit (zero-shot editing);
- `evaluate`: eval, tune-steps, ref-stats, train-classifier.

Errors in the user's input end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..checkpoint import CheckpointError
from ..training.state import ResumeError, TrainingError
from . import edit, evaluate, sample, train

USER_ERRORS = (CheckpointError, ValueError, OSError, TrainingError, ResumeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmfast",
        description="cmfast: one- and few-step generation with consistency models (Song et al., ICML 2023).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (sample, train, edit, evaluate):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except BrokenPipeError:  # output piped into a reader that stopped early (| head): not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    except USER_ERRORS as err:
        print(f"cmfast {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
