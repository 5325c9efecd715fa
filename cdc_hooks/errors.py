"""Errors a user can act on: the CLI prints the message alone and exits with exit_code."""


class CdcHooksError(Exception):
    exit_code = 1


class ConfigError(CdcHooksError, ValueError):
    """A config that cannot be used; the message names the hook and the problem."""

    exit_code = 2


class MatchError(CdcHooksError, ValueError):
    """A match that cannot be used; the message names the field and the problem."""

    exit_code = 2


class ListenerError(CdcHooksError, ValueError):
    """A listener that cannot be created or changed as asked."""

    exit_code = 2


class NotFound(CdcHooksError, LookupError):
    exit_code = 1


class DatabaseUnavailable(CdcHooksError):
    """PostgreSQL cannot be reached; the message names host and port, never the password."""

    exit_code = 1


class MalformedDsn(DatabaseUnavailable):
    """A DSN that does not parse as meant; the message says where it came from, never what it is."""

    exit_code = 2


class AlreadyQueued(CdcHooksError):
    """Redelivery of a delivery that is still pending: it will be sent anyway (HTTP 409)."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """What went wrong, in one line: the first non-blank line of the message (psycopg's
    says what happened, "connection refused"; the lines after it are hints), else the
    exception's type."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
