"""How the command line talks to its user: logging, each warning as one line, and user errors as one line.

Kept apart from `cli.py` (the commands and their flags) so that neither grows past a screenful of concerns.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

from .hub.push import HubUploadError


def configure_logging(verbose: bool) -> None:
    logger = logging.getLogger("optimum_recon")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


@contextlib.contextmanager
def one_line_warnings(verbose: bool) -> Iterator[None]:
    """Show each warning once, as one line (``optimum-recon: warning: ...``) instead of Python's form with the
    library's source path and line under it; ``-v`` keeps Python's form."""
    if verbose:
        yield
        return
    shown: set[str] = set()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip()
        if text in shown:
            return
        shown.add(text)
        label = "warning" if issubclass(category, UserWarning) else category.__name__
        print(f"optimum-recon: {label}: {text}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user's input or environment causes: printed as one line (a traceback with -v)."""
    import torch

    from .reconstruction.training import NonFiniteTrainingError

    return (ValueError, OSError, ImportError, NotImplementedError, HubUploadError, NonFiniteTrainingError,
            torch.linalg.LinAlgError, torch.cuda.OutOfMemoryError)


def error_line(err: BaseException) -> str:
    import torch

    text = str(err).strip() or type(err).__name__
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in text:
        text += f": {err.filename}"
    if isinstance(err, torch.cuda.OutOfMemoryError):
        text = ("out of memory on the accelerator: use a smaller --batch-size, --gradient-checkpointing, "
                "--train-dtype bfloat16, or --device-map auto with --activation-offload disk (" + text.splitlines()[0]
                + ")")
    elif isinstance(err, torch.linalg.LinAlgError):
        text += " Raise --dampening (e.g. 0.1) or check the calibration data."
    return " ".join(text.split())  # one line, whatever the message
