"""FastAPI dependencies, as `Annotated` aliases: `SessionDep`, `SettingsDep`, `TokenDep`,
`BearerDep`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
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


def get_principal(session: SessionDep, credentials: BearerDep) -> Principal:
    """The caller (`api.auth.principal_for`: one rule for every route)."""
    return authenticate(session, credentials.credentials if credentials is not None else None)


TokenDep = Annotated[Principal, Depends(get_principal)]
