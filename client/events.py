"""Server-sent events, as the job event stream (``GET /v1/jobs/{id}/events``) sends them: a
parser from text lines to `ServerEvent`s (the WHATWG rules the stream uses: ``event:``, ``data:``
lines joined with newlines, ``id:``, ``retry:``, comment lines starting with ``:``, an event
dispatched at a blank line), kept apart from the network so it is tested on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServerEvent:
    """One dispatched event: its type (``message`` when the stream named none), its data (the
    ``data:`` lines joined), and the last event id seen so far (for ``Last-Event-ID``)."""

    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data) if self.data else None


@dataclass
class _Pending:
    event: str = ""
    data: list[str] | None = None


def parse_events(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """The events in `lines` (without their line endings), in order. Comments (``: ping``)
    dispatch nothing; a block without ``data:`` dispatches nothing (as in browsers); an event
    cut off by the end of the stream, before its blank line, is dropped."""
    last_id: str | None = None
    pending = _Pending()
    for line in lines:
        if line == "":
            if pending.data is not None:
                yield ServerEvent(pending.event or "message", "\n".join(pending.data), last_id)
            pending = _Pending()
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            pending.event = value
        elif name == "data":
            pending.data = [*(pending.data or []), value]
        elif name == "id" and "\0" not in value:
            last_id = value
        # ``retry:`` and unknown fields: the client reconnects on its own schedule.
