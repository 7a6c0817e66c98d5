"""How stage two speaks to its user. A TrainError is bad input caught before the first step: cli.py
prints it as one line (cause and fix) and exits with code 2. ``console`` says everything else."""

import sys

from storage.errors import UserError


class TrainError(UserError, ValueError):
    """Training cannot start as asked: the message names the cause and the fix in one line."""


def console(line: str) -> None:
    """A line for the user: on stderr beside the progress bar, as ``train: ...`` (rank 0 only: see train)."""
    print(f"train: {line}", file=sys.stderr, flush=True)
