"""The errors a user gets as one line, and the wrapper every command's ``main`` runs in.

Bad input is refused by a ``ValueError`` (or a missing file's error) that names the key, the
value and what is allowed; the commands print it as ``error: <message>`` and exit with status 2,
without a traceback (tracebacks are for bugs; ``HYDRA_FULL_ERROR=1`` shows them anyway).
"""

from __future__ import annotations

import os
import sys

from priors.data import DownloadError

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    DownloadError,
)


def user_error_exit(error: Exception) -> None:
    """Re-raise under HYDRA_FULL_ERROR=1; otherwise print ``error: <message>`` and exit 2."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)


def run_command(task, cfg, *args, **kwargs):
    """``task(cfg, ...)``, its user errors turned into one line and exit status 2."""
    try:
        return task(cfg, *args, **kwargs)
    except USER_ERRORS as e:
        user_error_exit(e)
