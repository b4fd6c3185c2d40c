"""The client's HTTP side: one `ApiClient` over httpx that sends the bearer token and turns
every failure into a `ClientError` carrying one readable line and the exit status.

Exit statuses (the whole program's, see `client.main`):

====  =========================================================================================
0     success (``watch``: the job succeeded)
1     the server refused the request (its error body, e.g. a 422 naming a field), or the watched
      job failed, or a downloaded file did not match its checksum
2     usage: a bad option or option value, caught before anything is sent
3     ``watch``: the job was cancelled
4     the server could not be reached, answered with a 5xx or something that is not the API, or
      the connection was lost and could not be re-established
====  =========================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from client.config import Connection

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4

# Reads of the API take milliseconds; a report over hundreds of jobs takes longer.
TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class ClientError(Exception):
    """A failure to print as one line (``error: <message>``) with exit status `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def error_line(response: httpx.Response) -> str:
    """The API's uniform error body (``{"error": {"code", "message", "fields"}}``) as one line:
    each field and its message when fields are named, else the message."""
    try:
        error = response.json()["error"]
        message = str(error["message"])
        fields = error.get("fields") or []
        code = str(error.get("code", ""))
    except (ValueError, KeyError, TypeError):
        text = " ".join(response.text.split())[:200]
        return f"HTTP {response.status_code} from {response.request.url}: {text or 'no body'}"
    if fields:
        return "; ".join(f"{item['field']}: {item['message']}" for item in fields)
    if code == "not_found" and response.status_code == 404:
        # The route itself is missing (a job that is not there says job_not_found).
        return (
            f"the server has no {response.request.method} {response.request.url.path} "
            "(is it an older version?)"
        )
    return message


class ApiClient:
    """The API at `connection.server`, with `connection.token` as the bearer token."""

    def __init__(self, connection: Connection) -> None:
        self.server = connection.server
        headers = {"User-Agent": "jumpout-client"}
        if connection.token:
            headers["Authorization"] = f"Bearer {connection.token}"
        self.http = httpx.Client(base_url=connection.server, headers=headers, timeout=TIMEOUT)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def unreachable(self, error: Exception) -> ClientError:
        if isinstance(error, httpx.ConnectError):
            return ClientError(
                f"cannot reach {self.server}: is the server running? (make run)", EXIT_UNREACHABLE
            )
        if isinstance(error, httpx.TimeoutException):
            return ClientError(f"{self.server} did not answer in time", EXIT_UNREACHABLE)
        if isinstance(error, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return ClientError(f"the server URL {self.server!r} is not an http(s) URL", EXIT_USAGE)
        return ClientError(f"lost the connection to {self.server}: {error}", EXIT_UNREACHABLE)

    def check(self, response: httpx.Response) -> httpx.Response:
        """The response if it is a success, else `ClientError` with the API's message."""
        if response.is_success:
            return response
        if not response.is_stream_consumed:
            response.read()
        exit_code = EXIT_UNREACHABLE if response.status_code >= 500 else EXIT_REFUSED
        line = error_line(response)
        if response.status_code == 401:
            line += " (give a token with --token, JUMPOUT_TOKEN or the config file)"
        raise ClientError(line, exit_code)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise self.unreachable(error) from None
        return self.check(response)

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return _json(self.request("GET", path, **kwargs))

    def post_json(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return _json(self.request("POST", path, json=body, **kwargs))

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response, checked (the error body read) before it is handed out."""
        try:
            with self.http.stream(method, path, **kwargs) as response:
                self.check(response)
                yield response
        except httpx.HTTPError as error:
            raise self.unreachable(error) from None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except json.JSONDecodeError:
        raise ClientError(
            f"{response.request.url} did not answer with JSON: is it the jumpout API?",
            EXIT_UNREACHABLE,
        ) from None
