"""Errors of stage two. A TrainError is bad input caught before the first step: cli.py prints it
as one line (cause and fix) and exits with code 2."""


class TrainError(ValueError):
    """Training cannot start as asked: the message names the cause and the fix in one line."""


def load_error_cause(e: BaseException) -> str:
    """Why torch.load (or safetensors) refused a file, in one line, without torch's advice to retry
    with weights_only=False: that advice would run the file's code, which this tool never does."""
    advice = ("weights_only", "trusted source", "documentation", "add_safe_globals", "safe_globals")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if not any(a in ln for a in advice)), type(e).__name__)
    if "Weights only load failed" in str(e):
        cause = f"it holds Python objects, not only tensors, and is never unpickled ({cause})"
    return cause if len(cause) <= 200 else cause[:197] + "..."
