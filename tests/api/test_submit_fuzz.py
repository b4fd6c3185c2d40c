"""Whatever JSON a client sends, /v1/jobs answers 201 or a 4xx in the uniform shape, never 500."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.schemas import JobCreate

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["synthetic", "mlp", "digits", "../../etc/passwd", "jumpout", "dropout+I"])
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=5)
keys = st.sampled_from(list(JobCreate.model_fields)) | st.text(min_size=1, max_size=12)
names = {
    "dataset": st.sampled_from(["synthetic", "digits", "nope"]) | scalars,
    "architecture": st.sampled_from(["mlp", "cnn_small"]) | scalars,
}
specs = st.builds(
    lambda extra, base: {**extra, **base},
    st.dictionaries(keys, values, max_size=5),
    st.fixed_dictionaries({}, optional=names),
)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=specs)
def test_submit_never_answers_500(client, spec):
    # json.dumps writes NaN/Infinity literals, which Python's parser (and so FastAPI) accepts.
    content = json.dumps(spec)
    response = client.post(
        "/v1/jobs", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code in (201, 400, 413, 422, 429), response.text
    if response.status_code != 201:
        assert set(response.json()) == {"error"}
        assert response.json()["error"]["message"]
