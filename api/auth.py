"""Bearer tokens: created once (printed, never stored), kept as sha256 hashes, revocable at once.

Every request looks the token up by its hash, so revocation takes effect on the next request.
Tokens are never logged.

A token's scope: "full" (every route) or "metrics" (`GET /metrics` only: a scraper's token, which
every other route refuses with 403 whatever it asks; the metrics route alone opts in).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobstore.errors import Forbidden, TokenError, Unauthorized
from jobstore.settings import get_settings
from jobstore.tables import ApiToken, utcnow

TOKEN_PREFIX = "jo_"
FULL_SCOPE = "full"
METRICS_SCOPE = "metrics"
TOKEN_SCOPES = (FULL_SCOPE, METRICS_SCOPE)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token (id, name) or the anonymous owner when auth is off."""

    id: int | None
    name: str | None
    is_admin: bool = False

    @property
    def is_anonymous(self) -> bool:
        return self.id is None


ANONYMOUS = Principal(id=None, name=None, is_admin=False)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_token(
    session: Session, *, name: str, is_admin: bool = False, scope: str = FULL_SCOPE
) -> tuple[ApiToken, str]:
    """Store a new token under `name`; returns the row and the plaintext (shown once)."""
    name = name.strip()
    if not name or len(name) > 64:
        raise TokenError("a token name must be 1 to 64 characters")
    if scope not in TOKEN_SCOPES:
        raise TokenError(f"a token's scope is one of {', '.join(TOKEN_SCOPES)}, not {scope!r}")
    if is_admin and scope != FULL_SCOPE:
        raise TokenError("an admin token has the full scope")
    token = generate_token()
    row = ApiToken(name=name, token_hash=hash_token(token), is_admin=is_admin, scope=scope)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise TokenError(f"a token named {name!r} already exists") from None
    return row, token


def _find(session: Session, name_or_id: str) -> ApiToken | None:
    row = session.scalars(select(ApiToken).where(ApiToken.name == name_or_id)).one_or_none()
    if row is None and name_or_id.isdigit() and len(name_or_id) <= 9:
        row = session.get(ApiToken, int(name_or_id))
    return row


def revoke_token(session: Session, *, name_or_id: str) -> ApiToken:
    row = _find(session, name_or_id)
    if row is None:
        session.rollback()
        raise TokenError(f"no token named {name_or_id!r} (or with that id)")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.commit()
    return row


def list_tokens(session: Session) -> list[ApiToken]:
    rows = list(session.scalars(select(ApiToken).order_by(ApiToken.id)))
    session.commit()
    return rows


def principal_for(
    token: str | None, find: Callable[[str], Any], *, metrics_scope_ok: bool = False
) -> Principal:
    """Who is calling, the one rule for every route: a presented token must be valid (looked up
    on every request with ``find(sha256)``, so a revocation takes effect on the next one) even
    when auth is optional; without one the caller is the anonymous owner, or `Unauthorized` when
    `auth_required`. A metrics-scoped token is `Forbidden` unless the route says
    `metrics_scope_ok` (`GET /metrics` alone). ``find`` returns a row with ``token_hash``,
    ``revoked_at``, ``id``, ``name``, ``is_admin`` and ``scope``, or None."""
    if not token:
        if get_settings().auth_required:
            raise Unauthorized("missing API token: send 'Authorization: Bearer <token>'")
        return ANONYMOUS
    digest = hash_token(token)
    row = find(digest)
    # The lookup is by hash, so timing reveals nothing about the token; compare_digest anyway.
    if row is None or not secrets.compare_digest(row.token_hash, digest):
        raise Unauthorized("invalid API token")
    if row.revoked_at is not None:
        raise Unauthorized("this API token has been revoked")
    # Anything but the full scope is refused unless the route says otherwise (an unknown scope
    # too: a row edited by hand, or a scope a later version adds, gets no more than metrics).
    if row.scope != FULL_SCOPE and not (row.scope == METRICS_SCOPE and metrics_scope_ok):
        raise Forbidden(
            f"this token's scope is {row.scope}: it may read GET /metrics only"
            if row.scope == METRICS_SCOPE
            else f"this token's scope ({row.scope}) opens no route"
        )
    return Principal(id=row.id, name=row.name, is_admin=row.is_admin)


def authenticate(session: Session, token: str | None) -> Principal:
    """`principal_for` with the token looked up through the session."""

    def find(digest: str) -> ApiToken | None:
        row = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).one_or_none()
        session.commit()
        return row

    return principal_for(token, find)
