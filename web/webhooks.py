"""The Stripe webhook receiver: verify, persist, enqueue through the outbox, answer 2xx.

Checks run cheapest first, and nothing unauthenticated is parsed beyond what stripe needs:
method -> content type -> declared size -> signature header present, printable ASCII and
bounded -> body read under the size cap (and the app's body deadline) -> signature (every
configured secret, so a secret can be rotated) -> JSON -> storable (nesting depth, string
lengths, no NUL or lone surrogate, numbers Postgres can hold) -> event shape -> one statement
(event row + outbox row), shared by concurrent requests. A rejected request stores and
enqueues nothing, answers 4xx (Stripe retries only 5xx-worthy failures: an outage) and is
logged without any of its content.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
import stripe
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from stripe import WebhookSignature  # bound once: `stripe.X` is a lazy module __getattr__

from core.log import get_logger, info_lines
from core.settings import Settings
from db.engine import connect_options, libpq_url

log = get_logger(__name__)

PATH = "/webhooks/stripe"
MAX_BODY_BYTES = 1024 * 1024  # Stripe events are a few KiB; 1 MiB is generous
SIGNATURE_HEADER = "stripe-signature"
MAX_SIGNATURE_HEADER = 4096  # t=…,v1=… per secret: a few hundred bytes
MAX_DEPTH = 64  # Stripe objects nest a handful of levels
MAX_STRING = 64 * 1024  # any one string or key in the event
MAX_ID = 255  # event id and type
# Postgres' numeric holds exponents far beyond this; a float must also be finite in Python.
MAX_EXPONENT = 1000
# Year 9999: to_timestamp() and datetime both overflow beyond it.
_MAX_CREATED = 253_402_300_799

# Group commit: the events of concurrent requests are stored by one statement. It is atomic
# like any single statement: an outbox row exists exactly for each event row that was new, and
# a duplicate delivery (even twice in one batch) inserts neither. The arrays go in binary
# (%(…)b): a text array quotes every element and escapes each '"' of a JSON payload with a
# regular-expression substitution in Python, ~70 us of the server's CPU per event; the binary
# form copies the UTF-8 bytes.
_STORE_EVENTS = """
    WITH input AS (
        SELECT * FROM unnest(%(ids)b::text[], %(types)b::text[], %(created)b::timestamptz[],
                             %(livemode)b::boolean[], %(api_versions)b::text[],
                             %(payloads)b::text[])
            AS t(id, type, created, livemode, api_version, payload)
    ), event AS (
        INSERT INTO webhook_events (id, type, created, livemode, api_version, payload, status,
                                    attempts)
        SELECT id, type, created, livemode, api_version, payload::jsonb, 'received', 0
        FROM input
        ON CONFLICT (id) DO NOTHING
        RETURNING id
    )
    INSERT INTO outbox (actor, queue_name, args)
    SELECT 'process_event', 'payments', jsonb_build_array(event.id) FROM event
    RETURNING args ->> 0 AS id
"""
MAX_BATCH = 256


class Rejected(Exception):
    """A request refused before anything is stored; `reason` is safe to log and to return."""

    def __init__(self, status: int, reason: str, *, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


@dataclass(frozen=True)
class StripeEvent:
    id: str
    type: str
    created: datetime
    livemode: bool
    api_version: str | None
    payload: str  # the verified body, stored as received


# --- pure checks -------------------------------------------------------------------------------


def check_content_type(value: str | None) -> None:
    media_type = (value or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise Rejected(415, "unsupported content type")


def check_declared_size(value: str | None) -> int | None:
    if value is None:
        return None  # chunked: the cap is enforced while reading
    if not value.strip().isdigit():
        raise Rejected(400, "invalid content length")
    size = int(value)
    if size > MAX_BODY_BYTES:
        raise Rejected(413, "body too large")
    return size


def _signature_reason(exc: stripe.SignatureVerificationError) -> str:
    message = exc.user_message or ""
    if message.startswith("Timestamp outside the tolerance zone"):
        return "timestamp outside tolerance"
    if message.startswith(("Unable to extract timestamp", "No signatures found with expected")):
        return "malformed signature header"
    return "signature mismatch"


# A stale timestamp is only reported after a secret matched, so it is the most telling reason.
_REASON_ORDER = ("timestamp outside tolerance", "malformed signature header", "signature mismatch")


def check_signature_header(header: str | None) -> str:
    """Present, bounded and printable ASCII (stripe compares it with compare_digest, which
    refuses non-ASCII str with a TypeError)."""
    if not header:
        raise Rejected(400, "missing signature header")
    if len(header) > MAX_SIGNATURE_HEADER or not header.isascii() or not header.isprintable():
        raise Rejected(400, "malformed signature header")
    return header


def verify_signature(
    payload: str, header: str, *, secrets: tuple[str, ...], tolerance: int
) -> None:
    """Stripe's own verification against every secret; raises `Rejected` if none accepts."""
    reasons = []
    for secret in secrets:
        try:
            WebhookSignature.verify_header(payload, header, secret, tolerance=tolerance)
            return
        except stripe.SignatureVerificationError as exc:
            reasons.append(_signature_reason(exc))
    raise Rejected(400, min(reasons, key=_REASON_ORDER.index, default="signature mismatch"))


def _reject_constant(name: str) -> Any:
    # NaN / Infinity are not JSON and jsonb refuses them.
    raise ValueError(name)


class Unstorable(Exception):
    """Valid JSON that Postgres' jsonb cannot hold or that no Stripe event looks like."""


def _parse_float(text: str) -> float:
    # 1e200000 is valid JSON, but an infinity in Python and out of range for Postgres.
    try:
        exponent = Decimal(text).adjusted()
    except InvalidOperation:
        raise ValueError(text[:32]) from None
    if abs(exponent) > MAX_EXPONENT:
        raise Unstorable("number out of range")
    return float(text)


# Built once: json.loads with hooks builds a decoder and its scanner on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)


def _check_string(value: str) -> None:
    if len(value) > MAX_STRING:
        raise Unstorable("string too long")
    if value.isascii():
        if "\x00" in value:
            raise Unstorable("NUL character")
        return
    try:
        value.encode("utf-8")  # a lone surrogate (\ud800) is not encodable
    except UnicodeEncodeError:
        raise Unstorable("lone surrogate") from None
    if "\x00" in value:
        raise Unstorable("NUL character")


def check_storable(data: Any) -> None:
    """Walk the parsed body once (iteratively: depth is bounded here, not by the stack)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_string(value)
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise Unstorable("nested too deeply")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_string(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _plainly_storable(payload: str) -> bool:
    """True when the text alone shows the walk would pass: NUL and lone surrogates can only
    come from \\u escapes (the body was strictly decoded from UTF-8 and JSON forbids raw
    control characters), no string can be longer than the body, and no nesting deeper than
    its brackets. Most Stripe events pass here and skip the walk."""
    return (
        len(payload) <= MAX_STRING
        and "\\u" not in payload
        and payload.count("{") + payload.count("[") <= MAX_DEPTH
    )


def parse_event(payload: str) -> StripeEvent:
    """The verified body as a Stripe event; raises `Rejected` if it is not JSON, cannot be
    stored as it is, or is not a Stripe event."""
    try:
        data = _DECODER.decode(payload)
        if not _plainly_storable(payload):
            check_storable(data)
    except RecursionError:
        raise Rejected(400, "body is not storable (nested too deeply)") from None
    except Unstorable as exc:
        raise Rejected(400, f"body is not storable ({exc})") from None
    except ValueError:
        raise Rejected(400, "body is not JSON") from None

    def invalid(field: str) -> Rejected:
        return Rejected(400, f"not a Stripe event ({field})")

    if not isinstance(data, dict):
        raise invalid("object")
    if data.get("object") != "event":
        raise invalid("object")
    event_id = data.get("id")
    if not isinstance(event_id, str) or not event_id.startswith("evt_") or len(event_id) > MAX_ID:
        raise invalid("id")
    event_type = data.get("type")
    if not isinstance(event_type, str) or not event_type or len(event_type) > MAX_ID:
        raise invalid("type")
    created = data.get("created")
    # bool is an int subclass: `true` is not a timestamp.
    if (
        isinstance(created, bool)
        or not isinstance(created, int)
        or not 0 <= created <= _MAX_CREATED
    ):
        raise invalid("created")
    livemode = data.get("livemode")
    if not isinstance(livemode, bool):
        raise invalid("livemode")
    api_version = data.get("api_version")
    if api_version is not None and (not isinstance(api_version, str) or len(api_version) > 64):
        raise invalid("api_version")
    inner = data.get("data")
    if not isinstance(inner, dict) or not isinstance(inner.get("object"), dict):
        raise invalid("data.object")
    return StripeEvent(
        id=event_id,
        type=event_type,
        created=datetime.fromtimestamp(created, UTC),
        livemode=livemode,
        api_version=api_version,
        payload=payload,
    )


# --- I/O ---------------------------------------------------------------------------------------


async def read_body(receive: Receive) -> bytes:
    """The body, refused as soon as it passes the cap: a chunked or lying client cannot push
    more than MAX_BODY_BYTES into memory. Read from ASGI messages directly (what Starlette's
    `Request.stream` does, without its async generator: a few us per request)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Rejected(413, "body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _batch_params(events: list[StripeEvent]) -> dict[str, list[Any]]:
    return {
        "ids": [e.id for e in events],
        "types": [e.type for e in events],
        "created": [e.created for e in events],
        "livemode": [e.livemode for e in events],
        "api_versions": [e.api_version for e in events],
        "payloads": [e.payload for e in events],
    }


class EventWriter:
    """Stores events for the requests of one server process, many per statement.

    Each request waits for the commit that holds its event before it is answered. While one
    batch is being written the next requests queue up and go together in the next statement,
    so under load a round trip and a commit are shared, and when idle a batch is one event.
    """

    def __init__(self, settings: Settings) -> None:
        assert settings.database_url
        self.url = libpq_url(settings.database_url)
        self.options = connect_options(settings)  # no server-side prepares behind PgBouncer
        self.queue: asyncio.Queue[tuple[StripeEvent, asyncio.Future[bool]]] = asyncio.Queue()
        self.conn: psycopg.AsyncConnection[Any] | None = None
        # In a context of its own: the task is started by the first request, and the batch's
        # log lines (written here) must not carry whatever that request had bound.
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name="webhook-writer", context=contextvars.Context()
        )

    async def store(self, event: StripeEvent) -> bool:
        """True if the event was new; raises if it could not be stored."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((event, future))  # unbounded: never waits
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            # One turn of the loop first: requests whose tasks are already runnable (parsed in
            # the same turn that woke this one) join this batch instead of waiting for the next
            # commit. Idle, it costs one loop iteration; under load it makes batches ~20 %
            # larger, and a batch's fixed cost (~200 us of this process's CPU) is shared wider.
            await asyncio.sleep(0)
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            stored = await self._store_batch(batch)
            # One line per stored event, as each request's own would be, written together: a
            # line written alone costs a request more than its signature check and parse.
            rows = [{"event_id": e.id, "type": e.type, "duplicate": not new} for e, new in stored]
            try:
                info_lines(__name__, "webhook_received", rows)
            except Exception:  # every request waits on this task: a log line must not end it
                with contextlib.suppress(Exception):
                    log.exception("webhook_log_failed")

    async def _store_batch(
        self, batch: list[tuple[StripeEvent, asyncio.Future[bool]]]
    ) -> list[tuple[StripeEvent, bool]]:
        """Store the batch and settle each request's future; (event, new) for each stored."""
        try:
            new = await self._write([event for event, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return []
            # One bad event (say a body jsonb refuses) must not fail its neighbours: retry
            # them one by one so that only the bad one gets its error.
            stored = []
            for event, future in batch:
                try:
                    inserted = event.id in await self._write([event])
                except Exception as single:
                    _settle(future, exc=single)
                else:
                    _settle(future, result=inserted)
                    stored.append((event, inserted))
            return stored
        stored = []
        claimed: set[str] = set()
        for event, future in batch:
            # the same event twice in one batch: the first is new, the second a duplicate
            inserted = event.id in new and event.id not in claimed
            _settle(future, result=inserted)
            claimed.add(event.id)
            stored.append((event, inserted))
        return stored

    async def _write(self, events: list[StripeEvent]) -> set[str]:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=5, **self.options
            )
        try:
            cursor = await self.conn.execute(_STORE_EVENTS, _batch_params(events))
            return {row[0] for row in await cursor.fetchall()}
        except psycopg.OperationalError:
            await self.conn.close()  # reconnect for the next batch
            raise


def _settle(
    future: asyncio.Future[bool], *, result: bool = False, exc: Exception | None = None
) -> None:
    if future.done():  # the request went away (client disconnect cancelled it)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


# The answers, rendered once: most requests get one of the first two.
_NEW = b'{"received":true,"duplicate":false}'
_DUPLICATE = b'{"received":true,"duplicate":true}'
_JSON = (b"content-type", b"application/json")


def _error(reason: str) -> bytes:
    return json.dumps({"error": reason}, separators=(",", ":")).encode()


def _request_headers(scope: Scope) -> tuple[str | None, str | None, str | None]:
    """Content type, content length and signature header, each the first one sent. One pass
    over the raw pairs (ASGI lowercases the names), as Starlette's `Headers.get` decodes them:
    latin-1."""
    content_type = length = signature = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            if content_type is None:
                content_type = value.decode("latin-1")
        elif name == b"content-length":
            if length is None:
                length = value.decode("latin-1")
        elif name == b"stripe-signature" and signature is None:
            signature = value.decode("latin-1")
    return content_type, length, signature


class StripeWebhook:
    """ASGI endpoint. A plain ASGI app (not a Starlette function endpoint): every method
    reaches it and a wrong one gets the same JSON error shape as every other refusal, and the
    server's front (`web.app.Front`) calls it without the router or the dashboard's
    middleware, whose per-request layers cost more than the checks here. The answer carries
    `headers` (the security headers every response gets) besides its own."""

    def __init__(self, settings: Settings, headers: list[tuple[bytes, bytes]]) -> None:
        self.settings = settings
        self.headers = [_JSON, *headers]
        self.writer: EventWriter | None = None  # started on the first event, inside the loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, body, extra = await self.handle(scope, receive)
        headers = [(b"content-length", str(len(body)).encode()), *self.headers, *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def handle(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, body, extra headers) of the answer."""
        method = scope["method"]
        size: int | None = None
        try:
            if method != "POST":
                raise Rejected(405, "method not allowed", headers={"Allow": "POST"})
            content_type, length, signature = _request_headers(scope)
            check_content_type(content_type)
            size = check_declared_size(length)
            header = check_signature_header(signature)
            try:
                body = await read_body(receive)
            except ClientDisconnect:
                raise Rejected(400, "client disconnected") from None
            size = len(body)
            try:
                payload = body.decode("utf-8")  # what stripe signs; it would decode it too
            except UnicodeDecodeError:
                raise Rejected(400, "body is not UTF-8") from None
            verify_signature(
                payload,
                header,
                secrets=self.settings.stripe_webhook_secrets,
                tolerance=self.settings.stripe_webhook_tolerance_s,
            )
            event = parse_event(payload)
        except Rejected as rejected:
            log.warning(
                "webhook_rejected",
                reason=rejected.reason,
                status=rejected.status,
                method=method,
                size=size,
            )
            extra = [(k.lower().encode(), v.encode()) for k, v in rejected.headers.items()]
            return rejected.status, _error(rejected.reason), extra

        try:
            if self.writer is None:
                self.writer = EventWriter(self.settings)
            inserted = await self.writer.store(event)
        except (psycopg.DataError, UnicodeError) as exc:
            # What the checks above missed and Postgres still refuses is the body's fault:
            # a 400 (nothing was stored), not a 503 Stripe would retry for three days.
            log.warning("webhook_rejected", reason="body is not storable", status=400, size=size)
            log.debug("webhook_unstorable", error=type(exc).__name__)
            return 400, _error("body is not storable"), []
        except (psycopg.Error, OSError) as exc:
            # Stripe retries any non-2xx for three days: 503 hands the event back to it.
            log.error(
                "webhook_store_failed", event_id=event.id, type=event.type, error=type(exc).__name__
            )
            return 503, _error("storage unavailable"), []
        # its `webhook_received` line was written by the writer with the rest of its batch
        return 200, _NEW if inserted else _DUPLICATE, []


def route(endpoint: StripeWebhook) -> Route:
    """The `POST /webhooks/stripe` route inside the Starlette app. `web.app.Front` sends that
    exact path to `endpoint` before routing; the route stays so that the router's trailing-slash
    redirect still leads there."""
    return Route(PATH, endpoint, name="stripe_webhook")
