"""RequestLimits' body deadline, in process: one timer watches every body read."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from starlette.types import Message

from web.app import RequestLimits

SCOPE = {"type": "http", "path": "/webhooks/stripe", "raw_path": b"/x", "query_string": b""}


async def read_all(scope: Any, receive: Any, send: Any) -> None:
    """An app that reads the whole body, then answers 200."""
    while True:
        message = await receive()
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def chunks(*delays: float) -> Any:
    """A receive that delivers one chunk after each delay, the last one ending the body."""
    pending = list(delays)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(pending.pop(0))
        return {"type": "http.request", "body": b"x", "more_body": bool(pending)}

    return receive


async def call(app: RequestLimits, receive: Any) -> int:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(dict(SCOPE), receive, send)
    return int(sent[0]["status"])


def test_slow_bodies_get_408_and_timely_ones_200_side_by_side() -> None:
    async def main() -> tuple[tuple[int, float], ...]:
        app = RequestLimits(read_all, body_timeout_s=0.3)

        async def timed(receive: Any) -> tuple[int, float]:
            started = time.monotonic()
            return await call(app, receive), time.monotonic() - started

        return tuple(
            await asyncio.gather(
                timed(chunks(60)),  # never completes: cancelled inside receive
                timed(chunks(0.01, 0.01, 0.01)),  # chunked, in time
                timed(chunks(0.1, 0.1, 0.1, 0.1, 0.1)),  # every chunk quick, the whole too slow
                timed(chunks(0.2)),  # started later than the first, still in time
            )
        )

    (never, never_s), (chunked, _), (trickle, trickle_s), (late, _) = asyncio.run(main())
    assert (never, chunked, trickle, late) == (408, 200, 408, 200)
    assert 0.25 < never_s < 2 and 0.25 < trickle_s < 2


def test_expiry_between_reads_refuses_the_next_read() -> None:
    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # a first chunk; more is announced
        await asyncio.sleep(0.3)  # the handler dawdles past the deadline, outside receive
        await read_all(scope, receive, send)

    status = asyncio.run(call(RequestLimits(slow_app, body_timeout_s=0.1), chunks(0, 0)))
    assert status == 408


def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def main() -> None:
        app = RequestLimits(read_all, body_timeout_s=60)
        task = asyncio.create_task(call(app, chunks(60)))
        await asyncio.sleep(0.05)
        task.cancel()  # say, the server shutting down
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not app.deadlines[asyncio.get_running_loop()].reads  # nothing left to watch

    asyncio.run(main())


def test_each_event_loop_gets_a_working_deadline() -> None:
    """A test client may run every request on a loop of its own: a timer armed on a loop
    that has since closed must not leave the next loop's slow bodies unwatched."""
    app = RequestLimits(read_all, body_timeout_s=0.2)
    assert asyncio.run(call(app, chunks(0.01))) == 200  # arms a timer on this loop, then closes
    started = time.monotonic()
    assert asyncio.run(call(app, chunks(60))) == 408
    assert time.monotonic() - started < 2


def test_shield_answers_an_unexpected_error_with_500_and_logs_it(capsys: Any, caplog: Any) -> None:
    # The webhook runs outside Starlette's error middleware (web.app.Front): with `shield`,
    # a bug in it still gets an answer, not a dropped connection.
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("a bug")

    async def answered_late(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("a bug after the answer started")

    async def scenario() -> tuple[list[Message], list[Message]]:
        results = []
        for app in (broken, answered_late):
            sent: list[Message] = []

            async def send(message: Message, sent: list[Message] = sent) -> None:
                sent.append(message)

            await RequestLimits(app, body_timeout_s=5, shield=True)(dict(SCOPE), chunks(0), send)
            results.append(sent)
        return results[0], results[1]

    first, second = asyncio.run(scenario())
    assert first[0]["status"] == 500
    assert first[1]["body"] == b'{"error": "internal error"}'
    # (where the line lands depends on how this process configured logging)
    logged = capsys.readouterr()
    assert "request_failed" in caplog.text + logged.out + logged.err
    # an answer already started is not followed by a second one
    assert [m["type"] for m in second] == ["http.response.start"]
    # without `shield` the error propagates (Starlette's own middleware answers it there)
    with pytest.raises(RuntimeError):
        asyncio.run(call(RequestLimits(broken, body_timeout_s=5), chunks(0)))
