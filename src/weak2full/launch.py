"""Start a stage script the way ``common.launcher`` says: ``python -m weak2full.launch stages/x.py ARGS``.

``common.launcher: python`` runs ``python stages/x.py ARGS``; ``torchrun`` runs
``torchrun --standalone --nproc_per_node common.nproc stages/x.py ARGS`` (one machine; for several, call
torchrun with your rendezvous flags yourself, see docs/SCALE.md). dvc.yaml starts the training stages,
``cams`` and ``pseudo_masks`` through this, so ``dvc repro`` follows the param while the stage's
command line stays the same. The params file is the stage's own ``--params`` (default params.yaml). The
process is replaced (``exec``), so DVC sees the stage's exit code.
"""

from __future__ import annotations

import os
import sys

from weak2full.errors import InvalidInputError, InvalidParameterError
from weak2full.params import load_params

__all__ = ["command", "main"]


def _params_file(args: list[str]) -> str:
    for i, a in enumerate(args):
        if a == "--params" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--params="):
            return a.split("=", 1)[1]
    return "params.yaml"


def command(script: str, args: list[str]) -> list[str]:
    """The argv that runs ``script`` with ``args`` under the launcher of the params ``args`` name."""
    common = load_params(_params_file(args)).common
    if common.launcher == "python" or "LOCAL_RANK" in os.environ:  # already one of torchrun's workers
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={common.nproc}", script, *args]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m weak2full.launch stages/<stage>.py [stage arguments]")
    try:
        cmd = command(argv[0], argv[1:])
    except (InvalidParameterError, InvalidInputError) as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
