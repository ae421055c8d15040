"""Property tests: whatever a provider answers, the parsers give a status or one of our
errors (with a message a person can read), never a crash of another kind."""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avatar_core.errors import AvatarError
from avatar_core.providers.base import Completed, Failed, Processing, Queued, error_text, parse_retry_after
from avatar_core.providers.segmind import SegmindProvider
from avatar_core.providers.wavespeed import WaveSpeedProvider

STATUSES = (Queued, Processing, Completed, Failed)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)

ws_status = st.sampled_from(["created", "processing", "completed", "failed", "cancelled", "timeout", "weird", ""])
ws_data = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=12), "status": ws_status | json_scalars},
    optional={"outputs": st.lists(st.text(max_size=30) | json_scalars, max_size=2) | json_values,
              "error": json_scalars,
              "timings": json_values, "model": json_scalars, "has_nsfw_contents": json_values},
)
ws_body = st.fixed_dictionaries(
    {"code": st.sampled_from([200, 200, 200, 400, 401, 429, 500, 5004]) | st.integers() | json_scalars},
    optional={"message": json_scalars, "data": ws_data | json_values},
) | json_values

sm_status = st.sampled_from(["QUEUED", "PROCESSING", "COMPLETED", "FAILED", "UNKNOWN"])
sm_body = st.fixed_dictionaries(
    {"status": sm_status | json_scalars},
    optional={"output": st.text(max_size=30) | json_scalars, "error": json_scalars, "metrics": json_values,
              "request_id": json_scalars},
) | json_values


def response(status: int, body) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=raw, headers={"content-type": "application/json"},
                          request=httpx.Request("GET", "http://x/"))


WS = WaveSpeedProvider("k", "http://127.0.0.1:9")
SM = SegmindProvider("k", "http://127.0.0.1:9")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(ws_body)
def test_wavespeed_any_reply_gives_a_status_or_our_error(body):
    try:
        status = WS.parse_status(WS._data(response(200, body), "rid"), "rid")
    except AvatarError as exc:
        assert exc.message and "Traceback" not in exc.message
        return
    assert isinstance(status, STATUSES)
    if isinstance(status, Completed):
        assert isinstance(status.video_url, str) and status.video_url


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([200, 404, 422, 500]), sm_body)
def test_segmind_any_reply_gives_a_status_or_our_error(code, body):
    try:
        status = SM.parse_status(response(code, body), "rid")
    except AvatarError as exc:
        assert exc.message
        return
    assert isinstance(status, STATUSES)
    if code == 422:
        assert isinstance(status, Failed)


@given(st.binary(max_size=200))
def test_garbage_bytes_are_a_protocol_error_not_a_crash(raw):
    for parse in (lambda r: WS.parse_status(WS._data(r, "rid"), "rid"), lambda r: SM.parse_status(r, "rid")):
        try:
            parse(response(200, raw))
        except AvatarError:
            pass


@given(st.integers(min_value=400, max_value=599), json_values | st.binary(max_size=50))
def test_error_text_is_short_and_never_raises(code, body):
    text = error_text(response(code, body))
    assert isinstance(text, str) and len(text) <= 310


@given(st.text(max_size=40))
def test_retry_after_parses_or_gives_none(value):
    parsed = parse_retry_after(value)
    assert parsed is None or 0 <= parsed <= 600


def test_retry_after_extremes():
    assert parse_retry_after("inf") == 600 and parse_retry_after("1e9") == 600
    assert parse_retry_after("nan") is None and parse_retry_after("-5") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("7") == 7.0
