"""Errors a user can act on. The CLI prints their message as one line, without a traceback."""


class TrtvaeError(Exception):
    pass


class OptionError(TrtvaeError, ValueError):
    """A command-line or API option is out of range or inconsistent."""


class ModelLoadError(TrtvaeError, ValueError):
    """The model could not be found, fetched or read."""


class ExportError(TrtvaeError, RuntimeError):
    """Export produced a graph that fails a check."""


class VerificationError(TrtvaeError, RuntimeError):
    """An exported component missed its accuracy threshold."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__
