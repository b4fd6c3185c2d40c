"""The `Idempotency-Key` header of the creating POSTs, on the API's side (`jobstore.idempotency`
holds the rule and the table): the header parameter the routes declare, and `create_once`, which
creates the resource with the key stored in its transaction, or finds what an earlier request
with the key created.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Header
from sqlalchemy.exc import IntegrityError

from api import queries
from jobstore.idempotency import HEADER, IdempotentRequest, StoredAnswer, stored_answer

T = TypeVar("T")

REPLAYED_HEADER = "Idempotent-Replayed"

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        description=(
            "Optional; a retry with the same key and body is answered with what the first "
            "request created (201, `Idempotent-Replayed: true`) instead of creating it again; "
            "the same key with another body is refused (422). 1 to 255 printable ASCII "
            "characters, e.g. a UUID; remembered for `idempotency_retention` (24 h)."
        ),
    ),
]

REPLAYED_RESPONSE_HEADERS = {
    REPLAYED_HEADER: {
        "description": "`true` when the answer is a replay of an earlier request with the same "
        "Idempotency-Key (nothing new was created); absent otherwise",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


def create_once(
    request: IdempotentRequest,
    create: Callable[[IdempotentRequest], T],
    replay: Callable[[StoredAnswer], T],
) -> tuple[T, bool]:
    """`(create(request), False)`, or `(replay(answer), True)` when a request with the same key
    created something already: found before creating, or when the key's unique constraint refused
    this one because a concurrent request stored it first (its transaction rolled back: nothing of
    this request was written). Raises `IdempotencyKeyRefused` when the key was used for another
    request. Blocking: call it in the thread pool."""
    answer = queries.read(stored_answer, request)
    if answer is None:
        try:
            return create(request), False
        except IntegrityError:
            answer = queries.read(stored_answer, request)
            if answer is None:  # some other constraint
                raise
    return replay(answer), True


def replay_headers(location: str) -> dict[str, Any]:
    return {"Location": location, REPLAYED_HEADER: "true"}
