"""Stripe webhook intake over real HTTP: a uvicorn server in a thread, real Postgres behind it.

Events are signed with stripe's own signer. A refused request must leave webhook_events and
outbox empty; an accepted one stores exactly one event row and one outbox row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import stripe
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.proc import free_port
from core.settings import Settings, get_settings
from tests.support.scheduler import structlog_to_caplog
from tests.support.web import serve
from web import webhooks
from web.webhooks import MAX_BODY_BYTES, PATH

EMAIL = "alice.smith@example.com"
JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


@contextmanager
def client_for(settings: Settings) -> Iterator[httpx.Client]:
    with serve(settings) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture
def client(db: str) -> Iterator[httpx.Client]:
    with client_for(get_settings()) as c:
        yield c


def secret() -> str:
    return get_settings().stripe_webhook_secrets[0]


def sample_event(event_id: str = "evt_1PxTest", **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": 1_718_000_000,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "payment_intent.succeeded",
        "data": {
            "object": {
                "id": "pi_1PxTest",
                "object": "payment_intent",
                "amount": 1999,
                "currency": "eur",
                "receipt_email": EMAIL,
                "metadata": {"user_id": "6f1c0e1a-0000-4000-8000-000000000001"},
            }
        },
    }
    event.update(fields)
    return event


def signature(payload: str, *, key: str | None = None, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(
        payload, key or secret(), timestamp=timestamp
    )


def post_signed(
    client: httpx.Client,
    payload: str,
    *,
    key: str | None = None,
    timestamp: int | None = None,
    path: str = PATH,
) -> httpx.Response:
    headers = {**JSON_HEADERS, "Stripe-Signature": signature(payload, key=key, timestamp=timestamp)}
    return client.post(path, content=payload.encode(), headers=headers, follow_redirects=True)


def counts(sql: Any) -> tuple[int, int]:
    events = sql.execute("SELECT count(*) FROM webhook_events").fetchone()[0]
    outbox = sql.execute("SELECT count(*) FROM outbox").fetchone()[0]
    return events, outbox


def assert_refused(response: httpx.Response, status: int, error: str, sql: Any) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": error}
    assert counts(sql) == (0, 0)


# --- accepted ---------------------------------------------------------------------------------


def test_valid_event_is_stored_with_one_outbox_row(client, sql) -> None:
    # Given an event signed with the configured secret
    event = sample_event()
    payload = json.dumps(event)
    # When Stripe delivers it
    response = post_signed(client, payload)
    # Then it is acknowledged and stored once, with its follow-up queued in the outbox
    assert response.status_code == 200, response.text
    assert response.json() == {"received": True, "duplicate": False}
    row = sql.execute(
        "SELECT id, type, EXTRACT(EPOCH FROM created)::bigint, livemode, api_version, payload, "
        "status, attempts, last_error, processed_at FROM webhook_events"
    ).fetchall()
    assert row == [
        (
            "evt_1PxTest",
            "payment_intent.succeeded",
            1_718_000_000,
            False,
            "2024-06-20",
            event,
            "received",
            0,
            None,
            None,
        )
    ]
    outbox = sql.execute(
        "SELECT actor, queue_name, args, kwargs, dispatched_at FROM outbox"
    ).fetchall()
    assert outbox == [("process_event", "payments", ["evt_1PxTest"], {}, None)]


def test_answers_carry_the_security_headers_of_every_response(client, sql) -> None:
    # The receiver is called before the router and its middleware (web.app.Front): its
    # answers must still carry what SecurityHeaders puts on every other response.
    accepted = post_signed(client, json.dumps(sample_event()))
    refused = client.post(PATH, content=b"{}", headers={"content-type": "application/json"})
    for response in (accepted, refused):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["content-type"] == "application/json"
        assert int(response.headers["content-length"]) == len(response.content)
    assert (accepted.status_code, refused.status_code) == (200, 400)


def test_a_trailing_slash_still_leads_to_the_receiver(client, sql) -> None:
    # The route stays in the router, so its trailing-slash redirect still works.
    response = post_signed(client, json.dumps(sample_event()), path=PATH + "/")
    assert response.status_code == 200, response.text
    assert counts(sql) == (1, 1)


def test_duplicate_delivery_is_acknowledged_and_stores_nothing_new(client, sql) -> None:
    payload = json.dumps(sample_event())
    assert post_signed(client, payload).json() == {"received": True, "duplicate": False}
    # When Stripe delivers the same event again (a retry, signed anew)
    response = post_signed(client, payload, timestamp=int(time.time()) + 1)
    # Then it is acknowledged as a duplicate and nothing more is stored or queued
    assert response.status_code == 200
    assert response.json() == {"received": True, "duplicate": True}
    assert counts(sql) == (1, 1)


def test_event_without_api_version_and_live_mode_is_stored(client, sql) -> None:
    payload = json.dumps(sample_event(api_version=None, livemode=True))
    assert post_signed(client, payload).status_code == 200
    assert sql.execute("SELECT livemode, api_version FROM webhook_events").fetchall() == [
        (True, None)
    ]


def test_every_configured_secret_is_accepted_during_rotation(db, sql) -> None:
    rotated = dataclasses.replace(get_settings(), stripe_webhook_secrets=("whsec_old", "whsec_new"))
    with client_for(rotated) as client:
        old = post_signed(client, json.dumps(sample_event("evt_old")), key="whsec_old")
        new = post_signed(client, json.dumps(sample_event("evt_new")), key="whsec_new")
        retired = post_signed(client, json.dumps(sample_event("evt_x")), key=secret())
    assert (old.status_code, new.status_code) == (200, 200)
    assert retired.status_code == 400 and retired.json() == {"error": "signature mismatch"}
    assert sql.execute("SELECT id FROM webhook_events ORDER BY id").fetchall() == [
        ("evt_new",),
        ("evt_old",),
    ]
    assert counts(sql) == (2, 2)


def test_body_of_exactly_one_mib_is_accepted(client, sql) -> None:
    event = sample_event()
    # strings are bounded (MAX_STRING), bodies by size: pad with many strings
    chunks = ["x" * 16_000] * 64
    padding = MAX_BODY_BYTES - len(json.dumps({**event, "pad": [*chunks, ""]}))
    payload = json.dumps({**event, "pad": [*chunks, "x" * padding]})
    assert len(payload.encode()) == MAX_BODY_BYTES
    assert post_signed(client, payload).status_code == 200
    assert counts(sql) == (1, 1)


# --- refused: signature -----------------------------------------------------------------------


def test_missing_signature_header(client, sql) -> None:
    response = client.post(PATH, content=json.dumps(sample_event()), headers=JSON_HEADERS)
    assert_refused(response, 400, "missing signature header", sql)


@pytest.mark.parametrize("header", ["garbage", "t=soon,v1=abc", "t=1718000000", "v1=abc"])
def test_garbled_signature_header(client, sql, header) -> None:
    headers = {**JSON_HEADERS, "Stripe-Signature": header}
    response = client.post(PATH, content=json.dumps(sample_event()), headers=headers)
    assert_refused(response, 400, "malformed signature header", sql)


def test_wrong_secret(client, sql) -> None:
    response = post_signed(client, json.dumps(sample_event()), key="whsec_not_ours")
    assert_refused(response, 400, "signature mismatch", sql)


def test_timestamp_outside_tolerance_is_a_replay(client, sql) -> None:
    stale = int(time.time()) - get_settings().stripe_webhook_tolerance_s - 60
    response = post_signed(client, json.dumps(sample_event()), timestamp=stale)
    assert_refused(response, 400, "timestamp outside tolerance", sql)


def test_body_changed_after_signing(client, sql) -> None:
    signed = json.dumps(sample_event())
    tampered = signed.replace('"amount": 1999', '"amount": 1')
    assert tampered != signed
    headers = {**JSON_HEADERS, "Stripe-Signature": signature(signed)}
    response = client.post(PATH, content=tampered, headers=headers)
    assert_refused(response, 400, "signature mismatch", sql)


# --- refused: body ----------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["not json at all", '{"id": "evt_1"', "", "NaN"])
def test_signed_body_that_is_not_json(client, sql, payload) -> None:
    response = post_signed(client, payload)
    assert_refused(response, 400, "body is not JSON", sql)


def test_body_that_is_not_utf8(client, sql) -> None:
    headers = {**JSON_HEADERS, "Stripe-Signature": signature("{}")}
    response = client.post(PATH, content=b'{"id": "\xff"}', headers=headers)
    assert_refused(response, 400, "body is not UTF-8", sql)


def _without(field: str) -> dict[str, Any]:
    event = sample_event()
    del event[field]
    return event


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ([sample_event()], "object"),
        (sample_event(object="charge"), "object"),
        (_without("object"), "object"),
        (sample_event("ch_1PxTest"), "id"),
        (sample_event(id=42), "id"),
        (_without("type"), "type"),
        (sample_event(type=7), "type"),
        (sample_event(created="1718000000"), "created"),
        (sample_event(created=True), "created"),
        (sample_event(created=1.5e9), "created"),
        (sample_event(livemode="false"), "livemode"),
        (_without("livemode"), "livemode"),
        (sample_event(api_version=2024), "api_version"),
        (sample_event(data={}), "data.object"),
        (sample_event(data={"object": "pi_1"}), "data.object"),
        (_without("data"), "data.object"),
    ],
)
def test_signed_json_that_is_not_a_stripe_event(client, sql, event, field) -> None:
    response = post_signed(client, json.dumps(event))
    assert_refused(response, 400, f"not a Stripe event ({field})", sql)


def test_body_over_one_mib_refused_by_content_length(client, sql) -> None:
    payload = json.dumps({**sample_event(), "pad": "x" * MAX_BODY_BYTES})
    response = post_signed(client, payload)
    assert_refused(response, 413, "body too large", sql)


def test_chunked_body_over_one_mib_refused_while_reading(client, sql) -> None:
    # Given a client that sends no Content-Length: the cap must hold while streaming
    payload = json.dumps({**sample_event(), "pad": "x" * (2 * MAX_BODY_BYTES)}).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]

    headers = {**JSON_HEADERS, "Stripe-Signature": signature(payload.decode())}
    response = client.post(PATH, content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_refused(response, 413, "body too large", sql)


# --- refused: method, content type --------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_wrong_method(client, sql, method) -> None:
    payload = json.dumps(sample_event())
    headers = {**JSON_HEADERS, "Stripe-Signature": signature(payload)}
    response = client.request(method, PATH, content=payload, headers=headers)
    assert_refused(response, 405, "method not allowed", sql)
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
def test_wrong_content_type(client, sql, content_type) -> None:
    payload = json.dumps(sample_event())
    headers = {"Stripe-Signature": signature(payload)}
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = client.post(PATH, content=payload, headers=headers)
    assert_refused(response, 415, "unsupported content type", sql)


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=UTF-8"])
def test_json_content_type_with_or_without_parameters_is_accepted(client, sql, content_type):
    payload = json.dumps(sample_event())
    headers = {"Content-Type": content_type, "Stripe-Signature": signature(payload)}
    assert client.post(PATH, content=payload, headers=headers).status_code == 200


# --- storage down, logs -----------------------------------------------------------------------


def test_database_down_answers_503_so_stripe_retries(db, sql, caplog) -> None:
    caplog.set_level(logging.INFO)
    down = dataclasses.replace(
        get_settings(), database_url=f"postgresql://tidemill@127.0.0.1:{free_port()}/gone"
    )
    with client_for(down) as client:
        response = post_signed(client, json.dumps(sample_event()))
    assert response.status_code == 503
    assert response.json() == {"error": "storage unavailable"}
    failed = [r.msg for r in caplog.records if _event(r) == "webhook_store_failed"]
    assert failed and failed[0]["event_id"] == "evt_1PxTest"


def _event(record: logging.LogRecord) -> str | None:
    return record.msg.get("event") if isinstance(record.msg, dict) else None


def test_logs_carry_reason_and_size_but_no_payload(client, sql, caplog) -> None:
    caplog.set_level(logging.INFO)
    signed = json.dumps(sample_event())
    tampered = signed.replace('"amount": 1999', '"amount": 1')
    headers = {**JSON_HEADERS, "Stripe-Signature": signature(signed)}
    assert client.post(PATH, content=tampered, headers=headers).status_code == 400
    assert post_signed(client, signed).status_code == 200

    rejected = [r.msg for r in caplog.records if _event(r) == "webhook_rejected"]
    received = [r.msg for r in caplog.records if _event(r) == "webhook_received"]
    assert len(rejected) == 1 and len(received) == 1
    assert rejected[0]["reason"] == "signature mismatch"
    assert rejected[0]["size"] == len(tampered.encode())
    assert received[0]["event_id"] == "evt_1PxTest"
    assert received[0]["type"] == "payment_intent.succeeded"
    assert received[0]["duplicate"] is False
    # neither the address (masked or not) nor any other payload content reaches the logs
    assert "alice" not in caplog.text and "example.com" not in caplog.text
    assert "pi_1PxTest" not in caplog.text and "1999" not in caplog.text


def test_a_log_line_that_cannot_be_written_does_not_stop_intake(
    client, sql, caplog, monkeypatch
) -> None:
    """The `webhook_received` lines are written by the writer task every request waits on."""
    caplog.set_level(logging.INFO)

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("log sink gone")

    monkeypatch.setattr(webhooks, "info_lines", broken)
    for i in range(3):
        response = post_signed(client, json.dumps(sample_event(f"evt_log{i}")))
        assert response.status_code == 200 and response.json()["duplicate"] is False
    assert sql.execute("SELECT count(*) FROM webhook_events").fetchone()[0] == 3
    assert len([r for r in caplog.records if _event(r) == "webhook_log_failed"]) == 3


@pytest.fixture
def logs_to_caplog() -> None:
    structlog_to_caplog()


def test_batch_log_lines_carry_no_context_of_the_request_that_started_the_writer(
    db, logs_to_caplog, caplog
) -> None:
    """The writer task is started by the first request; the lines it writes for later
    requests' events must not carry what that request had bound."""
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        structlog.contextvars.bind_contextvars(request_id="r-first")
        writer = webhooks.EventWriter(get_settings())
        try:
            event = webhooks.parse_event(json.dumps(sample_event("evt_ctx1")))
            assert await writer.store(event) is True
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
            writer.task.cancel()
            if writer.conn is not None:
                await writer.conn.close()

    asyncio.run(scenario())
    received = [r.msg for r in caplog.records if _event(r) == "webhook_received"]
    assert [line["event_id"] for line in received] == ["evt_ctx1"]
    assert "request_id" not in received[0]


# --- hostile input: signed bodies that cannot be stored, headers, paths, slow bodies ------------


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def _with_raw(event: dict[str, Any], marker: str, raw: str) -> str:
    """The event serialised with the JSON text `raw` put where the string `marker` was."""
    return json.dumps(event).replace(json.dumps(marker), raw)


UNSTORABLE = {
    "NUL in a string": _with_raw(sample_event(), "pi_1PxTest", '"pi_\\u0000x"'),
    "lone surrogate": _with_raw(sample_event(), "pi_1PxTest", '"pi_\\ud800x"'),
    "huge exponent": _with_raw(sample_event(), "pi_1PxTest", "1e200000"),
    "tiny exponent": _with_raw(sample_event(), "pi_1PxTest", "1e-200000"),
    "nested 1000 deep": _with_raw(sample_event(), "pi_1PxTest", _nested(1000)),
    "nested 100 deep": _with_raw(sample_event(), "pi_1PxTest", _nested(100)),
    "string over 64 KiB": json.dumps(sample_event(pad="x" * (65 * 1024))),
}


@pytest.mark.parametrize("name", sorted(UNSTORABLE))
def test_signed_body_that_cannot_be_stored_is_refused_with_400(client, sql, name) -> None:
    response = post_signed(client, UNSTORABLE[name])
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("body is not storable")
    assert counts(sql) == (0, 0)


@pytest.mark.parametrize("field", ["type", "id", "api_version"])
def test_over_long_identifiers_are_refused(client, sql, field) -> None:
    value = "evt_" + "x" * 1000 if field == "id" else "x" * 1000
    response = post_signed(client, json.dumps(sample_event(**{field: value})))
    assert_refused(response, 400, f"not a Stripe event ({field})", sql)


@pytest.mark.parametrize(
    "header",
    ["t=1,v1=é", "t=1718000000,v1=" + "ü" * 64, "t=1,v1=abc\x01", "t=1,v1=" + "a" * 5000],
)
def test_non_ascii_or_oversized_signature_header_is_400(client, sql, header) -> None:
    payload = json.dumps(sample_event())
    headers = [(b"content-type", b"application/json"), (b"stripe-signature", header.encode())]
    response = client.post(PATH, content=payload, headers=headers)
    assert_refused(response, 400, "malformed signature header", sql)


def test_long_unauthenticated_path_is_answered_fast_and_health_stays_up(client, sql) -> None:
    import socket
    from urllib.parse import urlsplit

    # The case: a 100 KB path to the replay action took 22 s and stalled /healthz
    base = urlsplit(str(client.base_url))
    path = "/dashboard/webhooks/" + "a.b@c.d" * 15_000 + "/replay"
    request = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
    started = time.monotonic()
    with socket.create_connection((base.hostname, base.port), timeout=10) as sock:
        sock.sendall(request)
        answer = sock.recv(4096)
    assert answer[9:10] == b"4", answer[:80]
    assert time.monotonic() - started < 2
    path = "/dashboard/webhooks/" + "a.b@c.d" * 1_000 + "/replay"  # under the target limit
    response = client.post(path, content=b"")
    assert 400 <= response.status_code < 500
    assert client.get("/healthz").status_code == 200


def test_slow_body_gets_408_within_the_deadline(db, sql) -> None:
    import socket
    from urllib.parse import urlsplit

    quick = dataclasses.replace(get_settings(), web_body_timeout_s=1.0)
    with serve(quick) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        payload = json.dumps(sample_event()).encode()
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Stripe-Signature: {signature(payload.decode())}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        with socket.create_connection((host, port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(head + payload[:10])  # and then nothing more
            answer = sock.recv(4096)
            elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert 0.5 < elapsed < 8
    assert counts(sql) == (0, 0)


# hypothesis: headers and bodies as a hostile client (or a broken signer) sends them --------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    _json.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda extra, raw: _with_raw(sample_event(**extra), "pi_1PxTest", raw).encode(),
        st.dictionaries(
            st.sampled_from(["type", "id", "created", "livemode", "api_version", "data"]),
            _json,
            max_size=2,
        ),
        st.sampled_from(['"\\u0000"', '"\\udfff"', "1e99999", "-1e-99999", "[[[[[[1]]]]]]", "{}"]),
    ),
)
_header_values = st.one_of(
    st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b and b"\0" not in b),
    st.text(max_size=80).map(lambda t: t.encode("utf-8")),
    st.just(b"t=1,v1=\xff\xfe"),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=_raw_bodies,
    sign=st.sampled_from(["valid", "garbage", "none"]),
    garbage=_header_values,
    content_type=st.sampled_from([b"application/json", b"text/plain", b"application/json; x=\xff"]),
    method=st.sampled_from(["POST", "POST", "PUT", "GET"]),
)
def test_fuzzed_requests_never_5xx_and_store_nothing_when_refused(
    client, sql, body, sign, garbage, content_type, method
) -> None:
    headers = [(b"content-type", content_type)]
    if sign == "valid":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            headers.append((b"stripe-signature", signature(text).encode()))
    elif sign == "garbage":
        headers.append((b"stripe-signature", garbage))
    before = counts(sql)
    try:
        response = client.request(method, PATH, content=body, headers=headers)
    except httpx.LocalProtocolError:
        return  # the client itself refuses to send this header: nothing reached the server
    assert response.status_code < 500, (response.status_code, response.text)
    after = counts(sql)
    if response.status_code == 200:
        assert after[0] - before[0] in (0, 1) and after[0] - before[0] == after[1] - before[1]
    else:
        assert after == before
        assert response.json()["error"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.one_of(
        st.sampled_from(
            ["/", "/healthz", "/metrics", "/dashboard", "/dashboard/login", "/dashboard/webhooks"]
        ),
        st.text(
            st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_characters="?#%"),
            max_size=200,
        ).map(lambda t: "/dashboard/webhooks/" + t + "/replay"),
        st.text(
            st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%"),
            max_size=200,
        ).map(lambda t: "/" + t),
    ),
    method=st.sampled_from(["GET", "POST", "DELETE"]),
    body=st.binary(max_size=200),
)
def test_fuzzed_unauthenticated_paths_never_5xx(client, sql, path, method, body) -> None:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    try:
        response = client.request(method, path, content=body, headers=headers)
    except (httpx.LocalProtocolError, httpx.InvalidURL, httpx.UnsupportedProtocol):
        return
    assert response.status_code < 500 or path in ("/healthz",), (path, response.status_code)
    assert counts(sql) == (0, 0)
