"""Errors of stage two. A TrainError is bad input caught before the first step: cli.py prints it
as one line (cause and fix) and exits with code 2."""

from storage.errors import UserError


class TrainError(UserError, ValueError):
    """Training cannot start as asked: the message names the cause and the fix in one line."""
