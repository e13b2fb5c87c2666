"""API tokens: created by ``alloy token create`` (the secret is returned once), looked up by hash."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.security import generate_token, hash_token
from app.models import ApiToken, utcnow


def create_token(session: Session, *, name: str, admin: bool = False) -> str:
    """Insert a token and return its secret; only the hash is stored, so this is the one chance to see it."""
    secret = generate_token()
    session.add(ApiToken(name=name, token_hash=hash_token(secret), admin=admin))
    session.commit()
    return secret


def find_token(session: Session, *, secret: str) -> ApiToken | None:
    """The live token for a presented secret (lookup by its sha256, which is unique and constant-time-safe)."""
    return session.scalars(
        select(ApiToken).where(ApiToken.token_hash == hash_token(secret), ApiToken.revoked_at.is_(None))
    ).first()


def revoke_token(session: Session, *, token_id: str) -> bool:
    token = session.get(ApiToken, token_id)
    if token is None or token.revoked_at is not None:
        return False
    token.revoked_at = utcnow()
    session.commit()
    return True


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at)).all())


def ensure_token(session: Session, *, name: str, admin: bool = False) -> ApiToken:
    """The live token named ``name``, created if missing (an owner identity for local, non-HTTP submissions
    such as the CLI; its secret is discarded)."""
    token = session.scalars(
        select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
    ).first()
    if token is None:
        create_token(session, name=name, admin=admin)
        token = session.scalars(select(ApiToken).where(ApiToken.name == name)).one()
    return token
