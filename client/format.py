"""How the client shows values: accuracies as percentages, seconds as durations, timestamps in
local time; None as "-"."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any


def percent(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def timestamp(value: str | None) -> str:
    """An ISO timestamp from the API in local time, to the second."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def scalar(value: Any) -> str:
    """A spec value as typed on the command line: true/false, none, comma lists."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "[]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
