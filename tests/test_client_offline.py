"""`jumpout-client` without the service: its SSE parser, where it finds the server and token, how
an API error becomes one line, that it loads no torch, and ``watch`` as a process against a
scripted event stream (every final status's exit code; a dropped stream resumed with
``Last-Event-ID``; a stream that cannot be resumed). The real service: tests/integration/
test_client_cli.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from client.config import DEFAULT_SERVER, ConfigFileError, resolve_connection
from client.events import ServerEvent, parse_events
from client.http import error_line

CLIENT = Path(sys.executable).parent / "jumpout-client"


def run_client(
    *args: str, env: dict | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLIENT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# --- SSE parsing -------------------------------------------------------------------------------


def test_events_are_parsed_with_ids_comments_and_multiline_data():
    lines = [
        ": ping",
        "id: 1",
        "event: snapshot",
        'data: {"a":',
        "data:  1}",
        "",
        "",
        "event: ignored-without-data",
        "",
        "id: 2",
        "data: plain",
        "",
        "event: cut-off",
        "data: never dispatched",
    ]
    events = list(parse_events(lines))
    assert events == [
        ServerEvent("snapshot", '{"a":\n 1}', "1"),
        ServerEvent("message", "plain", "2"),
    ]
    assert events[0].json() == {"a": 1}


def test_the_last_id_carries_over_to_events_without_one():
    events = list(parse_events(["id: 7", "event: a", "data: x", "", "event: b", "data: y", ""]))
    assert [(event.event, event.id) for event in events] == [("a", "7"), ("b", "7")]


# --- Configuration -----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("JUMPOUT_SERVER", "JUMPOUT_TOKEN", "JUMPOUT_CLIENT_CONFIG", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_flags_beat_environment_beat_config_file(clean_env, monkeypatch):
    config = clean_env / "client.toml"
    config.write_text('server = "http://file:1"\ntoken = "from-file"\n')
    config.chmod(0o600)
    monkeypatch.setenv("JUMPOUT_CLIENT_CONFIG", str(config))
    assert resolve_connection().server == "http://file:1"
    assert resolve_connection().token == "from-file"
    monkeypatch.setenv("JUMPOUT_SERVER", "http://env:2/")
    monkeypatch.setenv("JUMPOUT_TOKEN", "from-env")
    assert resolve_connection() == resolve_connection(None, None)
    assert (resolve_connection().server, resolve_connection().token) == ("http://env:2", "from-env")
    flagged = resolve_connection("http://flag:3", "from-flag")
    assert (flagged.server, flagged.token) == ("http://flag:3", "from-flag")
    assert "from-flag" not in repr(flagged)


def test_default_config_path_and_default_server(clean_env):
    assert resolve_connection().server == DEFAULT_SERVER
    default = clean_env / ".config" / "jumpout" / "client.toml"
    default.parent.mkdir(parents=True)
    default.write_text('token = "t"\n')
    default.chmod(0o600)
    assert resolve_connection().token == "t"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = ", "not valid TOML"),
        ('tokn = "x"', "unknown key 'tokn'"),
        ("token = 3", "token must be a non-empty string"),
    ],
)
def test_a_bad_config_file_is_named(clean_env, monkeypatch, text, message):
    config = clean_env / "bad.toml"
    config.write_text(text)
    monkeypatch.setenv("JUMPOUT_CLIENT_CONFIG", str(config))
    with pytest.raises(ConfigFileError, match=message) as raised:
        resolve_connection()
    assert str(config) in str(raised.value)


def test_a_token_file_readable_by_others_is_warned_about(clean_env, monkeypatch, capsys):
    config = clean_env / "open.toml"
    config.write_text('token = "secret-value"\n')
    config.chmod(0o644)
    monkeypatch.setenv("JUMPOUT_CLIENT_CONFIG", str(config))
    resolve_connection()
    err = capsys.readouterr().err
    assert "chmod 600" in err and "secret-value" not in err


# --- Errors ------------------------------------------------------------------------------------


def _response(status: int, body, path: str = "/v1/jobs") -> httpx.Response:
    request = httpx.Request("POST", f"http://x{path}")
    if isinstance(body, str):
        return httpx.Response(status, text=body, request=request)
    return httpx.Response(status, json=body, request=request)


def test_error_body_becomes_one_line_naming_the_fields():
    body = {
        "error": {
            "code": "invalid_spec",
            "message": "invalid value for: p_max, epochs",
            "fields": [
                {"field": "p_max", "message": "must be a number in (0, 1), got 1.0"},
                {"field": "epochs", "message": "over max_epochs (1000)"},
            ],
        }
    }
    assert error_line(_response(422, body)) == (
        "p_max: must be a number in (0, 1), got 1.0; epochs: over max_epochs (1000)"
    )
    plain = {"error": {"code": "job_not_found", "message": "no job with id 'x'", "fields": []}}
    assert error_line(_response(404, plain)) == "no job with id 'x'"
    route = {"error": {"code": "not_found", "message": "Not Found", "fields": []}}
    assert "has no POST /v1/nothing" in error_line(_response(404, route, "/v1/nothing"))
    assert error_line(_response(502, "<html>\n bad gateway</html>")).startswith("HTTP 502 from")


def test_the_client_loads_neither_torch_nor_the_service():
    code = (
        "import sys, client.main, client.watch; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'api', 'jobstore', 'worker', 'sqlalchemy', 'celery')]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_bad_spec_value_is_refused_before_sending_with_the_spec_message():
    # No server at this address: the value is refused before any connection is tried.
    result = run_client(
        "submit", "--server", "http://127.0.0.1:9", "--dataset", "digits", "--arch", "mlp",
        "--p-max", "1.0",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "error: p_max: must be a number in (0, 1), got 1.0\n"
    assert result.stdout == ""


def test_a_server_that_is_down_is_one_line_and_status_4():
    result = run_client("ls", "--server", "http://127.0.0.1:9")
    assert result.returncode == 4
    assert result.stderr == (
        "error: cannot reach http://127.0.0.1:9: is the server running? (make run)\n"
    )


# --- watch against a scripted event stream -------------------------------------------------------


def _event(number: int, name: str, data) -> bytes:
    return f"id: {number}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _job(status: str, epoch: int, **extra) -> dict:
    return {
        "id": "j" * 32,
        "status": status,
        "attempt": 1,
        "cancel_requested": False,
        "progress": {"epoch": epoch, "epochs": 2, "fraction": epoch / 2, "eta_seconds": 1.0},
        "result": {"final_accuracy": 0.9 if status == "succeeded" else None},
        "error": "training diverged" if status == "failed" else None,
        **extra,
    }


def _metric(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 0.5, "train_accuracy": 0.8, "test_loss": 0.4,
            "test_accuracy": 0.85, "seconds": 0.1}  # fmt: skip


class ScriptedEvents(BaseHTTPRequestHandler):
    """``/v1/jobs/<scenario>/events``: the stream of a two-epoch job ending as the scenario says;
    ``drop``: the first connection breaks after epoch 1; ``dead``: it breaks after the first
    progress event and every reconnection is closed at once."""

    seen_last_ids: list[str | None] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        scenario = self.path.split("/")[3]
        last_id = self.headers.get("Last-Event-ID")
        type(self).seen_last_ids.append(last_id)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [
            (1, _event(1, "snapshot", {"job": _job("running", 0), "metrics": []})),
            (None, b": ping\n\n"),
            (
                2,
                _event(
                    2,
                    "progress",
                    {
                        "epoch": 1,
                        "step": 3,
                        "steps": 8,
                        "loss": 0.7,
                        "fraction": 0.2,
                        "eta_seconds": 3,
                    },
                ),
            ),  # fmt: skip
            (3, _event(3, "epoch", _metric(1))),
            (4, _event(4, "epoch", _metric(2))),
        ]
        final = {"drop": "succeeded", "dead": "succeeded"}.get(scenario, scenario)
        events.append((5, _event(5, "end", _job(final, 2))))
        if scenario == "dead" and last_id is not None:
            return  # accepted, then closed before a byte of the stream
        start = int(last_id) if last_id else 0
        for number, event in events:
            if number is None or number > start:
                self.wfile.write(event)
                self.wfile.flush()
            if (scenario == "drop" and last_id is None and number == 3) or (
                scenario == "dead" and number == 2
            ):
                return  # the connection closes mid-stream


@pytest.fixture
def scripted_server():
    ScriptedEvents.seen_last_ids = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedEvents)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("final", "code"), [("succeeded", 0), ("failed", 1), ("cancelled", 3)])
def test_watch_exit_status_tells_the_outcome_apart(scripted_server, final, code):
    result = run_client("watch", final, "--server", scripted_server)
    assert result.returncode == code, result.stderr
    assert "epoch   1/2  train loss 0.5000 acc 80.00%" in result.stderr
    assert f"job {final} {final}" in result.stderr
    if final == "failed":
        assert "training diverged" in result.stderr
    assert result.stdout == ""


def test_watch_resumes_a_dropped_stream_with_last_event_id(scripted_server):
    result = run_client("watch", "drop", "--server", scripted_server)
    assert result.returncode == 0, result.stderr
    assert ScriptedEvents.seen_last_ids == [None, "3"]
    # Each epoch printed once: nothing lost, nothing repeated across the reconnection.
    assert result.stderr.count("epoch   1/2  train") == 1
    assert result.stderr.count("epoch   2/2  train") == 1


def test_watch_gives_up_on_a_stream_that_cannot_be_resumed(scripted_server):
    result = run_client("watch", "dead", "--server", scripted_server, "--reconnect-for", "1")
    assert result.returncode == 4
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: lost the connection to") and "watch dead" in last
    assert len(ScriptedEvents.seen_last_ids) >= 2
