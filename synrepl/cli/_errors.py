"""The two ways a ``synrepl`` subcommand fails, and their exit statuses.

Every failure the user can do something about ends as one line on stderr,
``synrepl: error: <what> [(<hint>)]``, and an exit status; never as a
traceback (``--debug`` shows one for internal errors).
"""

from __future__ import annotations

__all__ = (
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_FLAGGED",
    "CliError",
    "UsageError",
    "RuntimeFailure",
)

#: Success (for ``doctor``: every check passed).
EXIT_OK = 0
#: A runtime failure (Redis unreachable, secret refused, ...) or, for
#: ``doctor``, a check that failed.
EXIT_FAILURE = 1
#: Bad usage, or a configuration that cannot be read or is invalid.
EXIT_USAGE = 2
#: ``positions``: a writer lags more than ``--max-lag`` or did not answer.
EXIT_FLAGGED = 3


class CliError(Exception):
    """A failure to report as one line, with its exit status."""

    code = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CliError):
    """Wrong arguments or an unusable configuration (exit status 2)."""

    code = EXIT_USAGE


class RuntimeFailure(CliError):
    """Something outside the command failed: Redis, an instance, a file (exit status 1)."""

    code = EXIT_FAILURE
