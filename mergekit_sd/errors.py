"""Error kinds, each tied to the exit code the command-line contract promises."""

from __future__ import annotations


class SdbuildError(Exception):
    """Base class: printed as one line by the CLI."""

    exit_code = 1


class UserError(SdbuildError):
    """Bad input (recipe, file, path, parameter): exit code 2, one line, no traceback."""

    exit_code = 2

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class StepError(SdbuildError):
    """A build step failed while running: exit code 1."""

    exit_code = 1


class VerifyError(SdbuildError):
    """A rebuilt or checked file does not match what was recorded: exit code 1."""

    exit_code = 1


def did_you_mean(word: str, choices) -> str:
    """A ' (did you mean X?)' suffix for an unknown name, or ''."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class SpaceError(SdbuildError):
    """A folder lacks the free space a build needs; found before anything is written: exit code 1."""

    exit_code = 1
