"""The optional parts of the install (pyproject's extras): a command that needs one
that is missing says which to install, in one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .errors import CdcHooksError

# The top-level modules each extra brings, as imported.
EXTRAS = {
    "web": frozenset({"fastapi", "starlette", "pydantic", "pydantic_core", "uvicorn", "jinja2",
                      "markupsafe", "multipart", "python_multipart", "psycopg_pool"}),
    "embedded": frozenset({"pgserver", "psutil"}),
}


class MissingExtra(CdcHooksError):
    """A command needs an extra that is not installed."""


@contextmanager
def needs(extra: str, what: str) -> Iterator[None]:
    """Turns the ImportError of a module of the extra, raised inside, into MissingExtra."""
    try:
        yield
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in EXTRAS[extra]:
            raise
        raise MissingExtra(f"{what} needs the '{extra}' extra ({missing} is not installed): "
                           f"pip install 'cdc-hooks[{extra}]'") from None
