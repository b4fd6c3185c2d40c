"""Where the client finds the server and its token: ``--server``/``--token`` flags, then the
``JUMPOUT_SERVER``/``JUMPOUT_TOKEN`` environment variables, then a TOML config file
(``~/.config/jumpout/client.toml``, or the path in ``JUMPOUT_CLIENT_CONFIG``)::

    server = "http://gpu-box:8000"
    token = "jo_..."

The client is a separate program from the service (it has no pydantic-settings), so it reads its
own two variables here rather than through `jobstore.settings`.
"""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8000"
CONFIG_ENV = "JUMPOUT_CLIENT_CONFIG"
SERVER_ENV = "JUMPOUT_SERVER"
TOKEN_ENV = "JUMPOUT_TOKEN"
CONFIG_KEYS = ("server", "token")


class ConfigFileError(Exception):
    """The config file exists but cannot be used; the message names the file."""


@dataclass(frozen=True)
class Connection:
    """The server's base URL and the bearer token (None: send no Authorization header)."""

    server: str
    token: str | None

    def __repr__(self) -> str:  # never the token, even in a debugging print
        return f"Connection(server={self.server!r}, token={'***' if self.token else None})"


def config_path() -> Path:
    """The config file's path: ``$JUMPOUT_CLIENT_CONFIG``, else under ``$XDG_CONFIG_HOME`` or
    ``~/.config``."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "jumpout" / "client.toml"


def read_config_file(path: Path) -> dict[str, str]:
    """The file's ``server`` and ``token`` (either may be missing); {} if there is no file."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise ConfigFileError(f"cannot read the config file {path}: {error.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigFileError(f"the config file {path} is not valid TOML: {error}") from None
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigFileError(
            f"the config file {path} has an unknown key {unknown[0]!r}; accepted: "
            + ", ".join(CONFIG_KEYS)
        )
    for key, value in data.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigFileError(f"the config file {path}: {key} must be a non-empty string")
    if "token" in data:
        _warn_if_readable_by_others(path)
    return {key: value.strip() for key, value in data.items()}


def _warn_if_readable_by_others(path: Path) -> None:
    # A token is a password: say so when the file holding it is readable by other users.
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(
            f"warning: {path} holds a token and is readable by other users (chmod 600 {path})",
            file=sys.stderr,
        )


def resolve_connection(server: str | None = None, token: str | None = None) -> Connection:
    """Flags first, then the environment, then the config file, then the default server.

    The file is read only when a flag and its variable leave something unset, so a broken file
    does not stop a command that names both."""
    server = server or os.environ.get(SERVER_ENV) or None
    token = token or os.environ.get(TOKEN_ENV) or None
    if server is None or token is None:
        from_file = read_config_file(config_path())
        server = server or from_file.get("server")
        token = token or from_file.get("token")
    return Connection(server=(server or DEFAULT_SERVER).rstrip("/"), token=token)
