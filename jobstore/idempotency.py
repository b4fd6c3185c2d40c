"""Idempotency keys of the POSTs that create something (`POST /v1/jobs`, `POST /v1/experiments`).

A client that lost the answer to a submission (a connection error, the API killed after the
commit) cannot know whether its job was stored. With an `Idempotency-Key` header it can simply
retry: the first request stores, in the same transaction as the job or experiment, a row
(`tables.IdempotencyKey`) of the caller, the route, the key, the sha256 of the request and what it
created; a retry with the same key and the same request is answered with that resource (no second
job, no second enqueue), the same key with another request is refused (422), and two concurrent
requests with one key create one resource (the unique constraint: the loser's transaction rolls
back and it reads the winner's row).

Keys are scoped to the caller (a token, or the anonymous owner) and route, and remembered for
`Settings.idempotency_retention` seconds: an older key is forgotten (deleted when it is reused,
and every so often in bulk by the request that stores a new one), so reusing it creates anew.

Without the header none of this runs: the submit path stays as fast as it was.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import bindparam, delete, insert, select

from jobstore.errors import FieldError, InvalidRequest
from jobstore.settings import get_settings
from jobstore.tables import IdempotencyKey, utcnow

HEADER = "Idempotency-Key"
JOBS_ROUTE = "POST /v1/jobs"
EXPERIMENTS_ROUTE = "POST /v1/experiments"
MAX_KEY_LENGTH = 255
ANONYMOUS_OWNER = 0  # the anonymous owner's `owner_id` (token ids start at 1)

# Visible ASCII and spaces: a UUID, a ULID, "retry-of-batch-7". No control characters.
_KEY = re.compile(r"[\x20-\x7e]+")

# How often (per process) a request that stores a key also deletes every expired key.
PURGE_EVERY_S = 300.0


class IdempotencyKeyRefused(InvalidRequest):
    """422: the header's value is not a usable key, or the key was used for another request."""

    def __init__(self, message: str):
        super().__init__(f"invalid value for: {HEADER}", fields=[FieldError(HEADER, message)])


def check_key(key: str) -> str:
    """The key as sent, or `IdempotencyKeyRefused` when it is empty, longer than 255 characters
    or holds anything but visible ASCII and spaces."""
    if not key.strip():
        raise IdempotencyKeyRefused("must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyRefused(f"at most {MAX_KEY_LENGTH} characters (got {len(key)})")
    if _KEY.fullmatch(key) is None:
        raise IdempotencyKeyRefused("only printable ASCII characters (0x20-0x7e) are allowed")
    return key


def fingerprint(route: str, body: Any) -> str:
    """sha256 of the route and the request body as canonical JSON (sorted keys): the same request
    sent again with other whitespace or key order has the same fingerprint."""
    canonical = orjson.dumps([route, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class IdempotentRequest:
    """One creating request that carried a key: who, where, which key, and its fingerprint."""

    owner_id: int | None
    route: str
    key: str
    request_sha256: str

    @classmethod
    def of(cls, *, owner_id: int | None, route: str, key: str, body: Any) -> IdempotentRequest:
        return cls(owner_id, route, check_key(key), fingerprint(route, body))

    @property
    def scope(self) -> dict[str, Any]:
        owner = ANONYMOUS_OWNER if self.owner_id is None else self.owner_id
        return {"owner_id": owner, "route": self.route, "key": self.key}


@dataclass(frozen=True)
class StoredAnswer:
    """What an earlier request with the key created."""

    resource_kind: str
    resource_id: str
    response_status: int


_FIND = select(
    IdempotencyKey.request_sha256,
    IdempotencyKey.resource_kind,
    IdempotencyKey.resource_id,
    IdempotencyKey.response_status,
    IdempotencyKey.created_at,
).where(
    IdempotencyKey.owner_id == bindparam("owner_id"),
    IdempotencyKey.route == bindparam("route"),
    IdempotencyKey.key == bindparam("key"),
)
_FORGET_EXPIRED_KEY = delete(IdempotencyKey).where(
    IdempotencyKey.owner_id == bindparam("owner_id"),
    IdempotencyKey.route == bindparam("route"),
    IdempotencyKey.key == bindparam("key"),
    IdempotencyKey.created_at < bindparam("cutoff"),
)
_INSERT = insert(IdempotencyKey.__table__)

_last_purge = 0.0
_purge_guard = threading.Lock()


def _cutoff(now: datetime | None = None) -> datetime:
    return (now or utcnow()) - timedelta(seconds=get_settings().idempotency_retention)


def stored_answer(executor: Any, request: IdempotentRequest) -> StoredAnswer | None:
    """The answer stored for this key, if it is within the retention; `IdempotencyKeyRefused`
    when the key was used for a different request. `executor`: a Connection or Session."""
    row = executor.execute(_FIND, request.scope).first()
    if row is None or row.created_at < _cutoff():
        return None
    if row.request_sha256 != request.request_sha256:
        raise IdempotencyKeyRefused(
            "this key was already used for a different request (another body or route); "
            "use a new key for a new request"
        )
    return StoredAnswer(row.resource_kind, row.resource_id, row.response_status)


def remember(
    connection: Any,
    request: IdempotentRequest,
    *,
    resource_kind: str,
    resource_id: str,
    response_status: int = 201,
) -> None:
    """Store the key in the caller's transaction (before the resource's own INSERT: on
    PostgreSQL a concurrent request with the same key waits here, on the unique index, and then
    fails with an `IntegrityError` that the caller answers by reading the winner). An expired
    row with this key is deleted first; every `PURGE_EVERY_S` all expired rows are."""
    now = utcnow()
    cutoff = _cutoff(now)
    connection.execute(_FORGET_EXPIRED_KEY, {**request.scope, "cutoff": cutoff})
    _purge_expired(connection, cutoff)
    connection.execute(
        _INSERT,
        {
            **request.scope,
            "request_sha256": request.request_sha256,
            "resource_kind": resource_kind,
            "resource_id": resource_id,
            "response_status": response_status,
            "created_at": now,
        },
    )


def _purge_expired(connection: Any, cutoff: datetime) -> None:
    global _last_purge
    with _purge_guard:
        if time.monotonic() - _last_purge < PURGE_EVERY_S:
            return
        _last_purge = time.monotonic()
    connection.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
