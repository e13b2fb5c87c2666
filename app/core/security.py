"""API token secrets: 256 random bits, stored only as their sha256 (a slow KDF adds nothing at that entropy)."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "alloy_"


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
