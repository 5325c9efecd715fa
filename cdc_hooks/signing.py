"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

A secret is ``whsec_`` + base64 of random bytes; a signature is ``v1,`` +
base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from .errors import ListenerError

PREFIX = "whsec_"


def generate_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a whsec_ secret; raises ListenerError if malformed."""
    if not secret.startswith(PREFIX):
        raise ListenerError("secret must start with whsec_")
    try:
        key = base64.b64decode(secret[len(PREFIX):], validate=True)
    except ValueError:
        raise ListenerError("secret must be whsec_ followed by base64") from None
    if len(key) < 16:
        raise ListenerError("secret must carry at least 16 bytes of key")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
    }


def verify(key: bytes, msg_id: str, timestamp: str, body: bytes, signature_header: str) -> bool:
    """True if any v1 signature in the header matches (for debug-receiver)."""
    try:
        expected = sign(key, msg_id, int(timestamp), body).split(",", 1)[1]
    except ValueError:
        return False
    for candidate in signature_header.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False
