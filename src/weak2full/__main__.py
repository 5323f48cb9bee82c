"""Command line: ``python -m weak2full results [--metrics metrics/evaluate.json]``.

Prints the evaluate stage's results as a Markdown table (methods x metrics, the oracle labelled as the
ceiling) followed by ``weak_over_full``, ready to paste into the README.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from weak2full.errors import InvalidInputError
from weak2full.report import format_results_table


def _results(args: argparse.Namespace) -> None:
    path = Path(args.metrics)
    if not path.is_file():
        raise InvalidInputError(f"{path} does not exist: run `dvc repro evaluate` first (or pass --metrics).")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path} is not valid JSON ({exc}).") from None
    try:
        print(format_results_table(table), end="")
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weak2full", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    results = commands.add_parser("results", help="print metrics/evaluate.json as a Markdown table")
    results.add_argument("--metrics", default="metrics/evaluate.json",
                         help="the evaluate stage's metrics file (default: metrics/evaluate.json)")
    results.set_defaults(func=_results)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except InvalidInputError as exc:
        print(f"weak2full {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
