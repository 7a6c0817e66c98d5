"""Calling cli.py in-process and checking the standard for bad input: one line `error: ...`, exit 2."""

from click.testing import CliRunner

from cli import main


def invoke(*args, **kw):
    """cli.py ARGS in this process (click's standalone mode): a traceback shows up as result.exception."""
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def escaped(res) -> BaseException | None:
    """An exception that escaped the command (a traceback for the user), or None."""
    return None if res.exception is None or isinstance(res.exception, SystemExit) else res.exception


def one_line_error(res, *fragments: str, code: int = 2) -> str:
    """Assert the command failed with exit `code` and one line `error: ...` (after any progress bar)
    naming every fragment; return that line."""
    assert escaped(res) is None, f"traceback: {res.exception!r}"
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    errors = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    tail = res.stderr.rstrip("\n").replace("\r", "\n").splitlines()[-1]
    assert tail == errors[0], res.stderr  # the error is the last thing printed, on its own line
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def one_line_message(excinfo) -> str:
    """The message of a raised error (a pytest.raises excinfo), checked to be one line."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg
