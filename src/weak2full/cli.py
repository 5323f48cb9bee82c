"""Entry-point plumbing shared by the thin scripts in ``stages/``.

A stage script builds its argparse (``--params`` plus the paths dvc.yaml passes), then calls
:func:`run_stage`, which loads and validates params.yaml and turns the project's own errors into one
readable line on stderr and exit code 2, instead of a traceback (a full disk too).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from weak2full.errors import InvalidInputError, InvalidParameterError, OutputWriteError
from weak2full.params import Params, load_params

__all__ = ["stage_parser", "run_stage"]


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def run_stage(name: str, work: Callable[[Params, argparse.Namespace], object], args: argparse.Namespace):
    """Validate params, run ``work(params, args)``; exit 2 with one clear line on bad params or input, or
    on an output that did not fit on the disk."""
    try:
        params = load_params(args.params)
        return work(params, args)
    except (InvalidParameterError, InvalidInputError, OutputWriteError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        if isinstance(exc, OutputWriteError):
            # HDF5 cannot close a file whose write failed, and retries at interpreter exit, where it
            # crashes (SIGSEGV). The partial output is already removed: leave without exit handlers.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)
