"""Listener URLs as shown: their credentials masked.

A listener URL may carry credentials (``https://alice:pw@host/``), sent as
Basic auth. The stored URL keeps them; wherever a URL is shown or passed on
as data (listings, the web pages and API, status, the
``cdc_hooks.listener_disabled`` event, error texts) it goes through
``redact_url``: the password becomes ``***`` (``https://alice:***@host/``),
and a user name without a password, often a token, becomes ``***`` itself.
"""

from __future__ import annotations

import re

# scheme://userinfo@ in a URL or in a text quoting URLs; the userinfo runs to the
# last @ before the host, as in urllib and yarl.
_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")
MASK = "***"


def redact_url(text: str) -> str:
    """The URL (or each URL in a text) with its credentials masked."""
    return _CREDENTIALS.sub(_masked, text)


def same_shown_url(url: str, stored: str) -> bool:
    """Whether url is the stored one, or the stored one as shown: a form sent back
    with the masked URL leaves the stored credentials alone."""
    return url in (stored, redact_url(stored))


def _masked(found: re.Match[str]) -> str:
    user, has_password, _ = found["userinfo"].partition(":")
    return f"{found['scheme']}{user + ':' + MASK if has_password else MASK}@"
