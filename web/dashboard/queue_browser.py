"""One queue's messages (ready, delayed, in flight, dead), one message with its attempts, the
worker processes, and the per-queue / per-actor history, read from the broker's Redis.

Every read is bounded by a page size: a page of the ready list is one LRANGE and one HMGET,
delayed messages are one HSCAN step, in-flight ones one SSCAN per worker holding the queue.
Arguments are shown masked: e-mail addresses and push tokens (as everywhere), and every value
under a key that names a secret.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from core.log import mask_personal
from workers.stats import (
    WORKER_MAX_AGE_S,
    WORKERS_KEY,
    attempts_key,
    dead_errors_keys,
    hourly_key,
    stats_key,
    worker_key,
)

NAMESPACE = "dramatiq"
STATES = ("ready", "delayed", "in_flight", "dead")
PAGE = 50
SECRET_KEY = re.compile(r"pass(word)?|secret|token|api[_-]?key|card|cvc|iban|auth", re.I)
ACK_SCAN_TTL_S = 10.0


def _k(name: str) -> str:
    return f"{NAMESPACE}:{name}"


def mask_value(value: Any, *, key: str = "") -> Any:
    """A message argument as shown: secrets by key name replaced, personal data masked."""
    if key and SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return mask_personal(value)
    if isinstance(value, dict):
        return {k: mask_value(v, key=str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(v) for v in value]
    return value


@dataclass(frozen=True)
class MessageRow:
    queue: str
    redis_id: str
    message_id: str
    actor: str
    args: str  # masked JSON
    enqueued_at: datetime | None
    eta: datetime | None
    retries: int
    holder: str | None = None  # the broker id of the worker holding it (in flight)


def _when(ms: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(ms) / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _row(queue: str, rid: str, raw: str | None, holder: str | None = None) -> MessageRow | None:
    if raw is None:
        return None  # acked between the two reads
    try:
        message = json.loads(raw)
    except ValueError:
        message = {}
    options = message.get("options") or {}
    shown = {"args": message.get("args", []), "kwargs": message.get("kwargs", {})}
    return MessageRow(
        queue=queue,
        redis_id=rid,
        message_id=str(message.get("message_id", "")),
        actor=str(message.get("actor_name", "?")),
        args=json.dumps(mask_value(shown), default=str)[:300],
        enqueued_at=_when(message.get("message_timestamp")),
        eta=_when(options.get("eta")),
        retries=int(options.get("retries", 0) or 0),
        holder=holder,
    )


@dataclass(frozen=True)
class Browse:
    state: str
    rows: list[MessageRow]
    next_cursor: str | None
    total: int


_ack_cache: dict[tuple[int, str], tuple[float, list[str]]] = {}


def _ack_keys(client: Any, queue: str) -> list[str]:
    """The workers' ack sets for `queue` (``dramatiq:__acks__.<broker id>.<queue>``), scanned
    at most every ACK_SCAN_TTL_S seconds."""
    now = time.monotonic()
    cached = _ack_cache.get((id(client), queue))
    if cached and now - cached[0] < ACK_SCAN_TTL_S:
        return cached[1]
    keys = sorted(
        str(k)
        for k in client.scan_iter(match=_k(f"__acks__.*.{queue}"), count=1000)
        if str(k).endswith(f".{queue}") and not str(k).endswith(f".{queue}.DQ")
    )
    _ack_cache[(id(client), queue)] = (now, keys)
    return keys


def browse(client: Any, queue: str, state: str, *, cursor: str | None, limit: int = PAGE) -> Browse:
    if state == "ready":
        start = int(cursor or 0)
        pipe = client.pipeline(transaction=False)
        pipe.lrange(_k(queue), start, start + limit - 1)
        pipe.llen(_k(queue))
        ids, total = pipe.execute()
        # index 0 is the next to be fetched: enqueue RPUSHes, a fetch takes from the left
        raws = client.hmget(_k(f"{queue}.msgs"), ids) if ids else []
        rows = [r for r in (_row(queue, i, raw) for i, raw in zip(ids, raws, strict=True)) if r]
        more = start + limit < int(total)
        return Browse(state, rows, str(start + limit) if more else None, int(total))
    if state == "delayed":
        scan_cursor, found = client.hscan(_k(f"{queue}.DQ.msgs"), int(cursor or 0), count=limit)
        rows = [r for r in (_row(queue, i, raw) for i, raw in found.items()) if r]
        rows.sort(key=lambda r: r.eta or datetime.max.replace(tzinfo=UTC))
        total = int(client.hlen(_k(f"{queue}.DQ.msgs")))
        return Browse(state, rows, str(scan_cursor) if int(scan_cursor) else None, total)
    if state == "in_flight":
        rows = []
        for key in _ack_keys(client, queue)[:50]:
            holder = key[len(_k("__acks__.")) : -len(queue) - 1]
            _, members = client.sscan(key, 0, count=limit)
            ids = [str(m) for m in members][: limit - len(rows)]
            if ids:
                raws = client.hmget(_k(f"{queue}.msgs"), ids)
                rows += [
                    r
                    for r in (_row(queue, i, raw, holder) for i, raw in zip(ids, raws, strict=True))
                    if r
                ]
            if len(rows) >= limit:
                break
        pipe = client.pipeline(transaction=False)
        pipe.hlen(_k(f"{queue}.msgs"))
        pipe.llen(_k(queue))
        held, ready = pipe.execute()
        return Browse(state, rows, None, max(int(held) - int(ready), 0))
    if state == "dead":
        start = int(cursor or 0)
        pipe = client.pipeline(transaction=False)
        pipe.zrevrange(_k(f"{queue}.XQ"), start, start + limit - 1)
        pipe.zcard(_k(f"{queue}.XQ"))
        ids, total = pipe.execute()
        raws = client.hmget(_k(f"{queue}.XQ.msgs"), ids) if ids else []
        rows = [r for r in (_row(queue, i, raw) for i, raw in zip(ids, raws, strict=True)) if r]
        more = start + limit < int(total)
        return Browse(state, rows, str(start + limit) if more else None, int(total))
    raise ValueError(f"unknown state {state!r}")


@dataclass(frozen=True)
class Attempt:
    at: datetime | None
    retries: int
    error: str
    traceback: str
    worker: str


@dataclass(frozen=True)
class MessageDetail:
    queue: str
    redis_id: str
    state: str  # "ready or in flight", "delayed", "dead"
    message_id: str
    actor: str
    args: str  # pretty masked JSON
    kwargs: str
    options: str  # masked JSON, traceback shown apart
    last_traceback: str
    enqueued_at: datetime | None
    eta: datetime | None
    dead_at: datetime | None
    final_error: str | None
    attempts: list[Attempt] = field(default_factory=list)


def message_detail(client: Any, queue: str, rid: str) -> MessageDetail | None:
    pipe = client.pipeline(transaction=False)
    pipe.hget(_k(f"{queue}.msgs"), rid)
    pipe.hget(_k(f"{queue}.DQ.msgs"), rid)
    pipe.hget(_k(f"{queue}.XQ.msgs"), rid)
    pipe.zscore(_k(f"{queue}.XQ"), rid)
    live, delayed, dead, died = pipe.execute()
    raw = live or delayed or dead
    if raw is None:
        return None
    state = "ready or in flight" if live else ("delayed" if delayed else "dead")
    try:
        message = json.loads(raw)
    except ValueError:
        message = {}
    options = dict(message.get("options") or {})
    tb = str(options.pop("traceback", "") or "")
    final_error = None
    if dead and died is not None:
        keys = dead_errors_keys(queue, float(died))
        errors = client.hmget(keys[0], [rid]) + client.hmget(keys[1], [rid])
        final_error = next((str(e) for e in errors if e), None)
    message_id = str(message.get("message_id", ""))
    attempts = []
    for item in client.lrange(attempts_key(message_id), 0, -1) if message_id else []:
        try:
            a = json.loads(item)
        except ValueError:
            continue
        attempts.append(
            Attempt(
                at=datetime.fromtimestamp(float(a.get("at", 0)), UTC),
                retries=int(a.get("retries", 0)),
                error=str(a.get("error", "")),
                traceback=str(a.get("traceback", "")),
                worker=str(a.get("worker", "")),
            )
        )
    return MessageDetail(
        queue=queue,
        redis_id=rid,
        state=state,
        message_id=message_id,
        actor=str(message.get("actor_name", "?")),
        args=json.dumps(mask_value(message.get("args", [])), indent=2, default=str),
        kwargs=json.dumps(mask_value(message.get("kwargs", {})), indent=2, default=str),
        options=json.dumps(mask_value(options), indent=2, default=str, sort_keys=True),
        last_traceback=mask_personal(tb)[-4000:],
        enqueued_at=_when(message.get("message_timestamp")),
        eta=_when(options.get("eta")),
        dead_at=_when(died) if died is not None else None,
        final_error=mask_personal(final_error) if final_error else None,
        attempts=attempts,
    )


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int | None
    threads: int | None
    rss_bytes: int | None
    booted_at: float | None
    heartbeat_age_s: float
    current: list[dict[str, Any]]


def workers(client: Any, *, now: float | None = None) -> list[WorkerInfo]:
    """Worker processes heard within the heartbeat max age, with what they report."""
    now = time.time() if now is None else now
    members = client.zrangebyscore(WORKERS_KEY, now - WORKER_MAX_AGE_S, "+inf", withscores=True)
    if not members:
        return []
    details = client.mget([worker_key(str(m)) for m, _ in members])
    out = []
    for (member, score), raw in zip(members, details, strict=True):
        try:
            d = json.loads(raw) if raw else {}
        except ValueError:
            d = {}
        host, _, pid = str(member).rpartition(":")
        current = [
            {**c, "running_s": max(now - float(c.get("since", now)), 0.0)}
            for c in d.get("current", [])
        ]
        out.append(
            WorkerInfo(
                id=str(member),
                host=str(d.get("host", host)),
                pid=int(d.get("pid", pid)) if str(d.get("pid", pid)).isdigit() else None,
                threads=d.get("threads"),
                rss_bytes=d.get("rss_bytes"),
                booted_at=d.get("booted_at"),
                heartbeat_age_s=round(max(now - float(score), 0.0), 1),
                current=current,
            )
        )
    return sorted(out, key=lambda w: w.id)


def series(
    client: Any,
    *,
    queue: str | None = None,
    actor: str | None = None,
    buckets: int,
    hourly: bool,
    now: float | None = None,
) -> list[tuple[int, int, int]]:
    """(bucket start in epoch seconds, finished, failed) for the last `buckets` minutes (or
    hours, from the 30-day hourly rollups), filtered to a queue and/or actor, oldest first."""
    step = 3600 if hourly else 60
    current = int((time.time() if now is None else now) // step)
    span = list(range(current - buckets + 1, current + 1))
    pipe = client.pipeline(transaction=False)
    for b in span:
        pipe.hgetall(hourly_key(b) if hourly else stats_key(b))
    out = []
    for b, row in zip(span, pipe.execute(), strict=True):
        processed = failed = 0
        for k, v in (row or {}).items():
            parts = str(k).split(":")
            if actor:
                if len(parts) != 3 or parts[2] != actor or (queue and parts[1] != queue):
                    continue
            elif len(parts) != 2 or (queue and parts[1] != queue):
                continue
            if parts[0] == "processed":
                processed += int(v)
            elif parts[0] == "failed":
                failed += int(v)
        out.append((b * step, processed + failed, failed))
    return out


def actors_seen(client: Any, *, hours: int = 24, now: float | None = None) -> list[str]:
    """(queue:actor) pairs with counts in the last `hours` hourly rollups, for the chart menu."""
    current = int((time.time() if now is None else now) // 3600)
    pipe = client.pipeline(transaction=False)
    for h in range(current - hours + 1, current + 1):
        pipe.hkeys(hourly_key(h))
    seen = set()
    for keys in pipe.execute():
        for k in keys:
            parts = str(k).split(":")
            if len(parts) == 3:
                seen.add(f"{parts[1]}:{parts[2]}")
    return sorted(seen)
