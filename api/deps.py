"""FastAPI dependencies, as `Annotated` aliases: `SessionDep`, `SettingsDep`, `TokenDep`,
`BearerDep`, and the cursor pages' query parameters `PageLimit`, `PageCursor`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import Principal, authenticate
from jobstore.db import get_session
from jobstore.settings import Settings, get_settings

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False, description="an API token: `python -m api token create`")

# The presented token, unchecked (it declares the security scheme in the OpenAPI schema): for the
# read routes that check it with `api.queries.principal` on their own connection.
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

PageLimit = Annotated[int, Query(ge=1, le=100)]
PageCursor = Annotated[str | None, Query(max_length=512, pattern=r"^[A-Za-z0-9_-]+$")]


def presented_token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The bearer token the request presented, if any (unchecked)."""
    return credentials.credentials if credentials is not None else None


def get_principal(session: SessionDep, credentials: BearerDep) -> Principal:
    """The caller (`api.auth.principal_for`: one rule for every route)."""
    return authenticate(session, presented_token(credentials))


TokenDep = Annotated[Principal, Depends(get_principal)]
