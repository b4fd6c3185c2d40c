"""The dashboard in a real headless Chromium against the real service (auth on, as deployed).

- With auth on the page asks for a token; once it is entered the list loads; the token is in no
  URL the browser requested and not in the API's access log, and every API call carried it in
  the Authorization header.
- A job submitted through the form (built from the OpenAPI schema; a 422 shows next to its
  field) trains while its page shows the curve gaining points, live; its checkpoint downloads
  through the page byte for byte; the compare view overlays it with a dropout job; a job is
  cancelled from the list.
- The experiment page shows the report with its confidence intervals drawn and per-row progress.
- A 200-epoch job with 10 dropout slots paints its page in under a second.

A screenshot of each page is saved to docs/screenshots/ (the README and docs/ show them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import statistics
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

JOB_ID = re.compile(r"#/jobs/([0-9a-f]{32})$")
# The job submitted through the form: enough epochs to be seen growing on its page.
WATCHED_EPOCHS = 150  # several samples (0.25 s apart) while it trains, on a fast machine too
SMALL = {"dataset": "digits", "architecture": "mlp", "train_size": 300, "test_size": 200}
FINAL = ("succeeded", "failed", "cancelled")
PAINT_BUDGET_MS = 1000
LIVE_MODE = "return document.getElementById('view').dataset.live"
PAINTED = "return document.getElementById('view').dataset.painted"
DASHES = """
return Chart.getChart(document.querySelector(arguments[0] + ' canvas'))
    .data.datasets.map((d) => d.borderDash.length);
"""
CHART_POINTS = """
const chart = Chart.getChart(document.querySelector(arguments[0] + ' canvas'));
if (!chart) return null;
return chart.data.datasets.map((d) => [d.label, d.data.length]);
"""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_until(predicate, *, timeout: float = 30.0, interval: float = 0.2, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )

        try:
            value = predicate()
        except (StaleElementReferenceException, NoSuchElementException):
            # The list re-renders its rows on every refresh: an element found a moment ago may
            # be gone; look again.
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def sign_in(driver, stack, token: str, route: str = "#/jobs") -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{stack.url}/{route}")
    wait_until(lambda: js(driver, "return document.getElementById('token-dialog').open"),
               what="the token prompt")  # fmt: skip
    driver.find_element(By.ID, "token-input").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_until(lambda: not js(driver, "return document.getElementById('token-dialog').open"),
               what="the prompt to close")  # fmt: skip


def screenshot(driver, path: Path) -> None:
    """The whole page (up to 4000 px tall), not only the window."""
    window = driver.get_window_size()
    height = js(driver, "return Math.min(document.documentElement.scrollHeight, 4000)")
    driver.set_window_size(window["width"], max(window["height"], height + 150))
    time.sleep(0.5)  # the charts follow the new size on the next frames
    driver.save_screenshot(str(path))
    driver.set_window_size(window["width"], window["height"])


def console_errors(driver) -> list[str]:
    """Script errors and CSP violations on the page. The browser also logs every 4xx answer
    ("Failed to load resource"), which these tests cause on purpose (401, 422): not counted."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and entry.get("source") != "network"
    ]


def requests_made(driver) -> list[dict]:
    """Every request the page made (Chromium's performance log): url and headers."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            sent.append({"url": request["url"], "headers": request.get("headers", {})})
    return sent


@pytest.fixture(scope="module")
def tokens(stack) -> dict[str, str]:
    return {name: stack.create_token(name) for name in ("alice", "bob")}


@pytest.fixture(scope="module")
def experiment_id(stack, tokens) -> str:
    """An experiment (bob's) submitted first, so that its jobs run while the others are tested;
    the fair share interleaves them with alice's."""
    base = {**SMALL, "epochs": 4, "train_size": 500}
    body = {"name": "table2-digits", "base": base, "preset": "table2", "seeds": 3}
    response = stack.client.post("/v1/experiments", json=body, headers=bearer(tokens["bob"]))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_with_auth_on_the_page_asks_for_a_token_and_keeps_it_out_of_urls_and_logs(
    browser, stack, tokens, experiment_id
):
    from selenium.webdriver.common.by import By

    token = tokens["alice"]
    browser.get(f"{stack.url}/#/jobs")
    wait_until(lambda: js(browser, "return document.getElementById('token-dialog').open"),
               what="the token prompt")  # fmt: skip
    # A wrong token is refused in the prompt, which stays.
    browser.find_element(By.ID, "token-input").send_keys("jo_" + "x" * 43)
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_until(lambda: browser.find_element(By.ID, "token-error").text, what="the refusal")
    assert js(browser, "return document.getElementById('token-dialog').open")
    field = browser.find_element(By.ID, "token-input")
    field.clear()
    field.send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#jobs-table"), what="the job list")
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr"))

    assert js(browser, "return sessionStorage.getItem('jumpout.token')") == token
    assert js(browser, "return localStorage.length") == 0
    assert token not in browser.current_url
    # A reload in the same tab keeps the session; the prompt does not come back.
    browser.refresh()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#jobs-table"), what="the list")
    assert not js(browser, "return document.getElementById('token-dialog').open")

    sent = requests_made(browser)
    api_calls = [request for request in sent if "/v1/" in request["url"]]
    assert api_calls, "the page made no API request"
    assert all(token not in request["url"] for request in sent)
    carried = [r for r in api_calls if r["headers"].get("Authorization") == f"Bearer {token}"]
    assert carried, "no API request carried the token in its Authorization header"
    access_log = stack.processes["api"].output()
    assert "GET /v1/jobs" in access_log, "uvicorn's access log is off: weak test"
    assert token not in access_log
    assert console_errors(browser) == []


def test_submit_watch_download_compare_and_cancel(
    browser, stack, tokens, experiment_id, screenshots, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    token = tokens["alice"]
    schema = stack.client.get("/openapi.json").json()
    job_create = schema["components"]["schemas"]["JobCreate"]
    sign_in(browser, stack, token, "#/submit")
    wait_until(lambda: browser.find_elements(By.ID, "field-dataset"), what="the form")

    # The form is the schema: one control per field, its choices and bounds.
    fields = browser.find_elements(By.CSS_SELECTOR, "#submit-form .field")
    assert {f.get_attribute("data-field") for f in fields} == set(job_create["properties"])
    options = [
        o.get_attribute("value")
        for o in Select(browser.find_element(By.ID, "field-dataset")).options
    ]
    assert options[1:] == job_create["properties"]["dataset"]["enum"]
    epochs_schema = job_create["properties"]["epochs"]["anyOf"][0]
    epochs = browser.find_element(By.ID, "field-epochs")
    assert float(epochs.get_attribute("max")) == epochs_schema["maximum"]

    def fill(name: str, value: str) -> None:
        element = browser.find_element(By.ID, f"field-{name}")
        js(browser, "arguments[0].closest('details')?.setAttribute('open', '')", element)
        if element.tag_name == "select":
            Select(element).select_by_value(value)
        else:
            element.clear()
            element.send_keys(value)

    form = {
        "dataset": "digits", "architecture": "mlp", "method": "jumpout",
        "epochs": str(WATCHED_EPOCHS), "p_min": "0.7", "p_max": "0.6",
        "train_size": "1000", "test_size": "200",
    }  # fmt: skip
    for name, value in form.items():
        fill(name, value)
    # The server refuses p_min >= p_max (a rule across fields): its message shows at the field.
    browser.find_element(By.ID, "submit-job").click()
    message = wait_until(lambda: browser.find_element(By.ID, "error-p_min").text, what="the 422")
    assert "p_max" in message
    assert "invalid" in browser.find_element(By.CSS_SELECTOR, "[data-field=p_min]").get_attribute(
        "class"
    )
    fill("p_min", "0.05")
    screenshot(browser, screenshots / "submit.png")
    browser.find_element(By.ID, "submit-job").click()
    wait_until(lambda: JOB_ID.search(browser.current_url), what="the job's page")
    job_id = JOB_ID.search(browser.current_url).group(1)

    # Live: the event stream when the server has it (the polling fallback only without it).
    expected = "stream" if "/v1/jobs/{job_id}/events" in schema["paths"] else "polling"
    wait_until(lambda: js(browser, LIVE_MODE) == expected, what=f"live updates by {expected}")

    # The accuracy curve gains points while the job runs.
    seen: list[tuple[int, str]] = []

    def sample():
        points = dict(js(browser, CHART_POINTS, "#chart-accuracy") or [])
        status = browser.find_element(By.CSS_SELECTOR, ".title-row .badge").get_attribute(
            "data-status"
        )
        seen.append((points.get("test", 0), status))
        return status in FINAL

    wait_until(sample, timeout=180, interval=0.25, what="the job to finish")
    while_running = sorted({count for count, status in seen if status == "running" and count})
    assert len(while_running) >= 2, f"the curve did not grow while running: {seen}"
    job = stack.job(job_id, headers=bearer(token))
    assert job["status"] == "succeeded", job

    def drawn(selector: str) -> dict[str, int]:
        return dict(js(browser, CHART_POINTS, selector) or [])

    wait_until(lambda: drawn("#chart-accuracy").get("test") == WATCHED_EPOCHS, what="every epoch")
    assert drawn("#chart-loss")["train"] == WATCHED_EPOCHS
    slots = js(browser, CHART_POINTS, "#chart-rate")
    assert slots and all(count == WATCHED_EPOCHS for _, count in slots), slots
    wait_until(lambda: "%" in browser.find_element(By.ID, "job-accuracy").text)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#checkpoints button.download"))
    if "/v1/jobs/{job_id}/log" in schema["paths"]:
        wait_until(lambda: browser.find_element(By.ID, "job-log").text.strip(), what="the log")
    screenshot(browser, screenshots / "job.png")

    # A checkpoint downloads through the page (fetch + blob, the token in the header).
    browser.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)}
    )
    browser.find_elements(By.CSS_SELECTOR, "#checkpoints button.download")[0].click()
    downloaded = wait_until(lambda: [p for p in tmp_path.glob("*.pt")], what="the download")
    checkpoints = stack.client.get(f"/v1/jobs/{job_id}/checkpoints", headers=bearer(token)).json()
    digest = hashlib.sha256(Path(downloaded[0]).read_bytes()).hexdigest()
    assert digest in {item["sha256"] for item in checkpoints["items"]}

    # Two more jobs: a dropout one to compare with, and a long one to cancel.
    dropout = stack.submit(headers=bearer(token), **SMALL, method="dropout", epochs=6)
    long_job = stack.submit(headers=bearer(token), dataset="digits", architecture="mlp", epochs=500)

    browser.get(f"{stack.url}/#/jobs")
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, f"tr[data-job-id='{long_job['id']}']")
    )
    for selected in (job_id, dropout["id"]):
        browser.find_element(
            By.CSS_SELECTOR, f"tr[data-job-id='{selected}'] input[type=checkbox]"
        ).click()
    screenshot(browser, screenshots / "jobs.png")
    browser.find_element(By.ID, "compare-selected").click()
    wait_until(lambda: "#/compare?ids=" in browser.current_url, what="the compare page")
    assert set(browser.current_url.split("ids=")[1].split(",")) == {job_id, dropout["id"]}
    stack.wait_finished(dropout["id"], timeout=120, headers=bearer(token))
    curves = wait_until(
        lambda: [c for c in js(browser, CHART_POINTS, "#compare-test_accuracy") or [] if c[1] == 6],
        timeout=30, what="the dropout job's curve in full",
    )  # fmt: skip
    labels = [label for label, _ in js(browser, CHART_POINTS, "#compare-test_accuracy")]
    assert len(labels) == 2 and any(l.startswith("jumpout") for l in labels), labels
    assert curves[0][0].startswith("dropout")
    dashes = js(browser, DASHES, "#compare-test_accuracy")
    assert sorted(dashes) == [0, 2], "dropout dashed, jumpout solid"
    screenshot(browser, screenshots / "compare.png")

    # Cancel from the list: two clicks (the second confirms).
    browser.get(f"{stack.url}/#/jobs")
    row = f"tr[data-job-id='{long_job['id']}']"
    button = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, f"{row} button.cancel-job"))[
        0
    ]
    button.click()
    assert "Confirm" in button.text
    button.click()
    cancelled = stack.wait_finished(long_job["id"], timeout=60, headers=bearer(token))
    assert cancelled["status"] == "cancelled", cancelled
    wait_until(
        lambda: (
            browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "cancelled"
        ),
        timeout=15,
        what="the list to show the cancel",
    )

    # Filters: two statuses (repeated in the query), an owner, then a method; kept in the hash.
    def listed() -> dict[str, str]:
        rows = browser.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr[data-job-id]")
        return {r.get_attribute("data-job-id"): r.get_attribute("data-status") for r in rows}

    def control(selector: str):
        # Each filter change re-renders the list: wait for the new control.
        return wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, selector), what=selector)[
            0
        ]

    for status in ("succeeded", "cancelled"):
        control(f".statuses input[value={status}]").click()
        wait_until(lambda s=status: f"status={s}" in browser.current_url)
    wait_until(lambda: listed(), what="the filtered list")
    control("input[name=owner]").send_keys("alice\n")
    wait_until(lambda: "owner=alice" in browser.current_url, what="the owner filter")
    wanted = {job_id: "succeeded", dropout["id"]: "succeeded", long_job["id"]: "cancelled"}
    wait_until(lambda: listed() == wanted, what=f"exactly {wanted}, got {listed()}")
    Select(control("select[name=method]")).select_by_value("dropout")
    wait_until(lambda: listed() == {dropout["id"]: "succeeded"}, what="the method filter")
    assert console_errors(browser) == []


def test_the_experiment_page_draws_the_report(browser, stack, tokens, experiment_id, screenshots):
    from selenium.webdriver.common.by import By

    token = tokens["bob"]

    def experiment_finished():
        response = stack.client.get(f"/v1/experiments/{experiment_id}", headers=bearer(token))
        progress = response.json()["progress"]
        return progress["finished"] == progress["total"] and response.json()

    finished = wait_until(experiment_finished, timeout=180, interval=1, what="the experiment")
    sign_in(browser, stack, token, "#/experiments")
    link = wait_until(
        lambda: browser.find_elements(
            By.CSS_SELECTOR, f"tr[data-experiment-id='{experiment_id}'] a"
        )
    )
    link[0].click()
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#report-table tbody tr"), what="the report"
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#report-table tbody tr")
    assert [r.get_attribute("data-row") for r in rows] == [r["label"] for r in finished["rows"]]
    assert all(r.find_elements(By.CSS_SELECTOR, ".ci-bar .range") for r in rows), "a CI not drawn"
    assert all("3/3 runs" in r.text for r in rows)
    chart = js(browser, CHART_POINTS, "#ci-chart")
    assert [label for label, _ in chart] == ["95% CI of the mean", "mean", "paper"]
    # Each row's mean is drawn on its row, inside the plot.
    placed = js(browser, """
        const chart = Chart.getChart(document.querySelector('#ci-chart canvas'));
        const area = chart.chartArea;
        return chart.getDatasetMeta(1).data.map((p) => p.x >= area.left && p.x <= area.right
            && p.y >= area.top && p.y <= area.bottom);""")  # fmt: skip
    assert placed == [True] * len(rows), placed
    # ... and seen: the pixel at each mean is the marker's dark blue, not the CI bar drawn over it
    # (in dataset order Chart.js drew the bar last and hid every mean inside its interval).
    mean_pixels = """
        const chart = Chart.getChart(document.querySelector('#ci-chart canvas'));
        const scale = chart.currentDevicePixelRatio;
        return chart.getDatasetMeta(1).data.map((p) => Array.from(chart.ctx.getImageData(
            Math.round(p.x * scale), Math.round(p.y * scale), 1, 1).data.slice(0, 3)));"""
    dark_blue = [[0x1E, 0x3A, 0x8A]] * len(rows)
    # Polled: the chart animates in for a moment after it is built.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: js(browser, mean_pixels) == dark_blue, timeout=5, what="the means")
    assert js(browser, mean_pixels) == dark_blue
    screenshot(browser, screenshots / "experiment.png")
    assert console_errors(browser) == []


STREAM_SCRIPT = """
const done = arguments[arguments.length - 1];
import("/static/js/api.js").then((api) => {
  const encoder = new TextEncoder();
  const body = (chunks) => new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
      controller.close();
    },
  });
  // The first connection drops after two events (no `end`); the second resumes.
  const answers = [
    ["retry: 20\\r\\n", "id: 1\\r\\nevent: snapshot\\r\\ndata: {\\"job\\":",
     "\\r\\ndata: 1}\\r\\n\\r", "\\n: ping\\r\\n\\r\\n",
     "id: 2\\nevent: epoch\\ndata: {\\"epoch\\": 1}\\n\\n"],
    ["id: 3\\nevent: epoch\\ndata: {\\"epoch\\": 2}\\n\\n", ": ping\\n\\n",
     "id: 4\\nevent: end\\ndata: {\\"status\\": \\"succeeded\\"}\\n\\n"],
  ];
  const calls = [];
  window.fetch = async (url, init) => {
    calls.push({ url, headers: init.headers });
    const headers = { "Content-Type": "text/event-stream" };
    return new Response(body(answers[calls.length - 1]), { headers });
  };
  const seen = [];
  api.openEventStream("/v1/jobs/x/events", {
    onEvent: (type, data, id) => seen.push([type, data, id]),
    onState: (state) => { if (state === "closed") done({ calls, seen }); },
  });
});
"""


def test_the_event_stream_reader_parses_and_resumes_with_last_event_id(browser, stack):
    # The page's own reader (no EventSource: it could not send the token) against answers cut
    # at awkward places: a CRLF split across chunks, a multi-line data field, comments.
    browser.get(f"{stack.url}/")
    # Once the page has asked for a token it makes no request of its own: every fetch below is
    # the reader's.
    wait_until(lambda: js(browser, "return document.getElementById('token-dialog').open"),
               what="the token prompt")  # fmt: skip
    browser.set_script_timeout(10)
    result = browser.execute_async_script(STREAM_SCRIPT)
    assert [call["url"] for call in result["calls"]] == ["/v1/jobs/x/events"] * 2
    first, second = (call["headers"] for call in result["calls"])
    assert "Last-Event-ID" not in first and second["Last-Event-ID"] == "2"
    assert first["Accept"] == "text/event-stream"
    assert result["seen"] == [
        ["snapshot", {"job": 1}, "1"],
        ["epoch", {"epoch": 1}, "2"],
        ["epoch", {"epoch": 2}, "3"],
        ["end", {"status": "succeeded"}, "4"],
    ]


SEED_JOB = """
import json, math, sys
from jobstore import db, jobs
from jobstore.tables import JobStatus
epochs, slots, owner = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
from api.auth import ApiToken
from sqlalchemy import select
with db.session_scope() as session:
    owner_id = session.scalar(select(ApiToken.id).where(ApiToken.name == owner))
    job = jobs.create_job(session, spec={"dataset": "synthetic", "architecture": "mlp",
                                         "epochs": epochs}, owner_id=owner_id)
    job_id = job.id
with db.session_scope() as session:
    claimed = jobs.claim_job(session, job_id, worker="browser-test")
    assert claimed is not None, "the worker took the seeded job first"
    rows = []
    for epoch in range(1, epochs + 1):
        t = epoch / epochs
        rows.append({"epoch": epoch, "train_loss": 2 * math.exp(-4 * t),
                     "train_accuracy": 1 - 0.9 * math.exp(-5 * t),
                     "test_loss": 2 * math.exp(-3 * t) + 0.1,
                     "test_accuracy": 0.95 - 0.85 * math.exp(-4 * t), "lr": 0.1 * (1 - t),
                     "seconds": 30.0, "images_per_second": 2000.0,
                     "layers": [{"name": f"slot{i}", "active_fraction": 0.5 - 0.02 * i + 0.05 * t,
                                 "rate": 0.3 + 0.01 * i - 0.05 * t, "capped_fraction": 0.0,
                                 "mean_drift": 1 + 0.01 * i * t, "var_drift": 1.2 - 0.01 * i * t}
                                for i in range(slots)]})
    jobs.record_epochs(session, job_id, rows)
    jobs.finish_job(session, job_id, status=JobStatus.SUCCEEDED)
print(job_id)
"""


def test_a_200_epoch_job_with_10_slots_paints_in_under_a_second(browser, stack, tokens):
    from selenium.webdriver.common.by import By

    job_id = stack.run("-c", SEED_JOB, "200", "10", "alice").stdout.strip().splitlines()[-1]
    sign_in(browser, stack, tokens["alice"])
    timings = []
    for _ in range(3):
        browser.get("about:blank")
        browser.get(f"{stack.url}/#/jobs/{job_id}")
        painted = wait_until(lambda: js(browser, PAINTED), what="the job's charts")
        timings.append(float(painted))
        for chart in ("#chart-loss", "#chart-accuracy"):
            assert {count for _, count in js(browser, CHART_POINTS, chart)} == {200}
        for chart in (
            "#chart-active_fraction",
            "#chart-rate",
            "#chart-mean_drift",
            "#chart-var_drift",
        ):
            counts = js(browser, CHART_POINTS, chart)
            assert len(counts) == 10 and {count for _, count in counts} == {200}, (chart, counts)
        assert browser.find_element(By.ID, "chart-var_drift").is_displayed()
    median = statistics.median(timings)
    shown = ", ".join(f"{t:.0f}" for t in timings)
    print(f"\nfirst paint of a 200-epoch, 10-slot job: {shown} ms (median {median:.0f})")
    assert median < PAINT_BUDGET_MS, timings
    assert console_errors(browser) == []
