"""FastAPI dependencies, as `Annotated` aliases: `SessionDep`, `SettingsDep`, `TokenDep`,
`BearerDep`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import ANONYMOUS, Principal, authenticate
from api.db import get_session
from api.errors import Unauthorized
from api.settings import Settings, get_settings

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False, description="an API token: `python -m api token create`")

# The presented token, unchecked (it declares the security scheme in the OpenAPI schema): for the
# read routes that check it with `api.queries.principal` on their own connection.
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_principal(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller. A presented token must be valid even when auth is optional; without one the
    caller is the anonymous owner, or 401 when `auth_required`."""
    if credentials is not None and credentials.credentials:
        return authenticate(session, credentials.credentials)
    if settings.auth_required:
        raise Unauthorized("missing API token: send 'Authorization: Bearer <token>'")
    return ANONYMOUS


TokenDep = Annotated[Principal, Depends(get_principal)]
