"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """Bad user input (a missing path, an unknown option value, too little data).

    ``ist-finetune`` prints ``ist-finetune: error: <message>`` on stderr and exits with
    status 2, without a traceback.

    Example:
        >>> str(CLIError("no such file: data.txt"))
        'no such file: data.txt'
    """
