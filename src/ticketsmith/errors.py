"""Exceptions. A `UsageError` is the user's to fix: the CLI prints its message on one line and
exits with status 2, without a traceback."""


class TicketsmithError(Exception):
    """Base class of every error ticketsmith raises on purpose."""


class UsageError(TicketsmithError, ValueError):
    """Bad input: an unknown name, a value out of range, a missing file, a mismatched mask."""


class DataNotFoundError(UsageError, FileNotFoundError):
    """A dataset's files are not where they were looked for."""


class ArtifactError(TicketsmithError):
    """A file ticketsmith wrote (or was asked to read) is corrupt, truncated or not ours."""


class DivergenceError(TicketsmithError):
    """Training produced a NaN or infinite loss."""
