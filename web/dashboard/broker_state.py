"""Queues and dead letters, read and changed straight in the dramatiq Redis broker.

The Redis broker's layout (dramatiq's ``dispatch.lua``), for a queue ``q`` in namespace
``dramatiq``:

- ``dramatiq:q`` list of message ids ready to fetch; ``dramatiq:q.msgs`` hash id -> message.
  A fetched, not yet acked message has left the list but not the hash, so in-flight (held by a
  worker) = ``HLEN q.msgs - LLEN q``.
- ``dramatiq:q.DQ`` / ``dramatiq:q.DQ.msgs`` the same for delayed messages (retries waiting
  out their backoff). Workers prefetch delayed messages and hold them until their eta, so the
  hash, not the list, counts them.
- ``dramatiq:q.XQ`` sorted set of dead-lettered ids scored by the time they died (ms),
  ``dramatiq:q.XQ.msgs`` hash id -> message.
- ``dramatiq:__heartbeats__`` sorted set of broker ids by last command (ms).

Every read here is O(1) per queue or bounded by a page size; only an explicit search or bulk
selection walks a dead-letter set, in chunks, with a budget.
"""

from __future__ import annotations

import heapq
import json
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from dramatiq.common import q_name

from core.log import get_logger, mask_personal
from core.settings import Settings
from workers.stats import DEAD_ERRORS_PREFIX, STATS_PREFIX, dead_errors_keys, stats_key
from workers.stats import live_workers as stats_live_workers

log = get_logger("web.dashboard")

NAMESPACE = "dramatiq"
# Queues the code base declares; others are found by a (cached) scan of the broker's keys.
KNOWN_QUEUES = (
    "default",
    "payments",
    "emails",
    "notifications",
    "cache",
    "maintenance",
    "pipelines",
    "backups",
)
CHUNK = 500
# Same-millisecond dead letters are never split across pages, up to this many.
MAX_PAGE_EXTENSION = 500
QUEUE_SCAN_TTL_S = 30.0


class BrokerUnavailable(RuntimeError):
    """The broker is not Redis (RabbitMQ keeps no dead-letter set we can read) or is down."""


class RetryFailed(RuntimeError):
    """The broker failed partway through a retry. `moved` letters are back on their queues;
    `remaining` (queue, id) pairs were not moved and are still dead letters."""

    def __init__(self, *, moved: int, remaining: list[tuple[str, str]], error: BaseException):
        super().__init__(f"moved {moved}, then {type(error).__name__}: {error}")
        self.moved = moved
        self.remaining = remaining
        self.error = error


@dataclass(frozen=True)
class QueueStats:
    name: str
    ready: int
    delayed: int
    in_flight: int
    dead: int
    oldest_age_s: float | None  # how long the oldest ready message has waited


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    redis_id: str
    message_id: str
    actor: str
    args: str  # JSON of args and kwargs, personal data masked
    error: str
    dead_at: datetime
    retries: int
    score: float
    raw: str = field(repr=False, default="")


@dataclass(frozen=True)
class DeadFilter:
    """Which dead letters: a queue, an exact actor name, and text found in the actor, message
    id, error or arguments (case-insensitive, in the masked text a viewer sees)."""

    queue: str | None = None
    actor: str | None = None
    text: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.actor or self.text)

    def describe(self) -> str:
        parts = [
            f"{k}={v!r}"
            for k, v in (("queue", self.queue), ("actor", self.actor), ("text", self.text))
            if v
        ]
        return ", ".join(parts) or "all"

    def matches(self, letter: DeadLetter) -> bool:
        if self.actor and letter.actor != self.actor:
            return False
        if self.text:
            needle = self.text.lower()
            # the masked text, as shown: searching must not reveal what the mask hides
            # (a viewer probing "alice.smith@" would learn the masked address is hers)
            haystacks = (letter.actor, letter.message_id, letter.error, mask_personal(letter.raw))
            if not any(needle in h.lower() for h in haystacks):
                return False
        return True


def _key(name: str) -> str:
    return f"{NAMESPACE}:{name}"


_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def broker_redis(settings: Settings) -> redis.Redis:
    """A client for the broker's Redis (BROKER_URL, else REDIS_URL), decoded to str."""
    url = settings.effective_broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise BrokerUnavailable(
            "the dashboard reads queues from a Redis broker; BROKER_URL is not redis://"
        )
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
            _clients[url] = client
    return client


_scan_cache: dict[int, tuple[float, set[str]]] = {}


def queue_names(client: redis.Redis) -> list[str]:
    """Known queues plus any queue with keys in the broker (scanned at most every 30 s)."""
    cached = _scan_cache.get(id(client))
    now = time.monotonic()
    if cached is None or now - cached[0] > QUEUE_SCAN_TTL_S:
        found: set[str] = set()
        prefix = f"{NAMESPACE}:"
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            name = str(key)[len(prefix) :]
            if name.startswith("__"):
                continue
            for suffix in (".DQ.msgs", ".XQ.msgs", ".msgs", ".DQ", ".XQ"):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
                    break
            found.add(q_name(name))
        _scan_cache[id(client)] = (now, found)
        cached = _scan_cache[id(client)]
    declared: set[str] = set()
    broker_module = sys.modules.get("workers.broker")  # declared queues, if this process has them
    if broker_module is not None:
        declared = {q_name(q) for q in broker_module.broker.get_declared_queues()}
    return sorted(set(KNOWN_QUEUES) | cached[1] | declared)


def forget_queue_scan() -> None:
    _scan_cache.clear()


def _waiting_since_ms(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        message = json.loads(raw)
        options = message.get("options") or {}
        # A retried message keeps its first enqueue time; it has waited since its eta.
        return float(options.get("eta") or message["message_timestamp"])
    except (ValueError, KeyError, TypeError):
        return None


def queue_stats(client: redis.Redis, queues: Iterable[str]) -> list[QueueStats]:
    names = list(queues)
    pipe = client.pipeline(transaction=False)
    for q in names:
        pipe.llen(_key(q))
        pipe.hlen(_key(f"{q}.msgs"))
        pipe.hlen(_key(f"{q}.DQ.msgs"))
        pipe.zcard(_key(f"{q}.XQ"))
        pipe.lindex(_key(q), 0)
    raw = pipe.execute()
    heads: list[str | None] = [raw[5 * i + 4] for i in range(len(names))]
    pipe = client.pipeline(transaction=False)
    for q, head in zip(names, heads, strict=True):
        pipe.hget(_key(f"{q}.msgs"), head) if head else pipe.echo("")
    first_messages = pipe.execute()
    now_ms = time.time() * 1000
    out = []
    for i, q in enumerate(names):
        ready, held, delayed, dead = raw[5 * i : 5 * i + 4]
        since = _waiting_since_ms(first_messages[i] or None)
        out.append(
            QueueStats(
                name=q,
                ready=int(ready),
                delayed=int(delayed),
                in_flight=max(int(held) - int(ready), 0),
                dead=int(dead),
                oldest_age_s=round(max(now_ms - since, 0) / 1000, 1) if since else None,
            )
        )
    return out


@dataclass(frozen=True)
class WorkerProcess:
    id: str  # hostname:pid
    last_seen_s: float


def live_workers(client: redis.Redis, *, now: float | None = None) -> list[WorkerProcess]:
    """Worker processes whose heartbeat (workers/stats.py) is under a minute old. Not dramatiq's
    broker heartbeats: every process that enqueues writes those, the web server included."""
    return [WorkerProcess(m, round(age, 1)) for m, age in stats_live_workers(client, now=now)]


def per_minute(
    client: redis.Redis, *, minutes: int = 60, now: float | None = None
) -> list[tuple[int, int, int]]:
    """(epoch minute, processed, failed) for the last `minutes` minutes, oldest first."""
    current = int((now if now is not None else time.time()) // 60)
    span = list(range(current - minutes + 1, current + 1))
    pipe = client.pipeline(transaction=False)
    for m in span:
        pipe.hgetall(stats_key(m))
    rows = pipe.execute()
    out = []
    for m, row in zip(span, rows, strict=True):
        processed = failed = 0
        for k, v in (row or {}).items():
            kind, *rest = str(k).split(":")
            if len(rest) != 1:  # a per-actor field: its queue's total already counts it
                continue
            if kind == "processed":
                processed += int(v)
            elif kind == "failed":
                failed += int(v)
        # failures are attempts too: throughput counts every message a worker finished
        out.append((m, processed + failed, failed))
    return out


# --- dead letters -----------------------------------------------------------------------------


def _decode(queue: str, rid: str, raw: str | None, error: str | None, score: float) -> DeadLetter:
    try:
        message = json.loads(raw or "{}")
    except ValueError:
        message = {}
    options = message.get("options") or {}
    if not error:
        tb = str(options.get("traceback") or "").strip()
        # Only the previous attempt's traceback is kept in the message: its last line.
        error = tb.splitlines()[-1] if tb else ""
    shown = {"args": message.get("args", []), "kwargs": message.get("kwargs", {})}
    return DeadLetter(
        queue=queue,
        redis_id=rid,
        message_id=str(message.get("message_id", "")),
        actor=str(message.get("actor_name", "?")),
        args=mask_personal(json.dumps(shown, default=str))[:400],
        error=mask_personal(error or "")[:500],
        dead_at=datetime.fromtimestamp(score / 1000, UTC),
        retries=int(options.get("retries", 0) or 0),
        score=score,
        raw=raw or "",
    )


def _chunks(
    client: redis.Redis, queues: list[str], upper: str, offsets: list[int], size: int
) -> list[tuple[list[DeadLetter], int]]:
    """The next chunk of several queues' dead letters in two round trips, whatever the number
    of queues: all range reads in one pipeline, then all message and error reads in another."""
    pipe = client.pipeline(transaction=False)
    for queue, offset in zip(queues, offsets, strict=True):
        pipe.zrevrangebyscore(
            _key(f"{queue}.XQ"), upper, "-inf", start=offset, num=size, withscores=True
        )
    ranges: list[list[Any]] = pipe.execute()
    found = _letters(
        client,
        [(q, str(r[0]), float(r[1])) for q, rows in zip(queues, ranges, strict=True) for r in rows],
    )
    out = []
    for queue, rows in zip(queues, ranges, strict=True):
        letters = []
        for r in rows:
            data, err = found[(queue, str(r[0]))]
            if data is not None:  # deleted between the two reads
                letters.append(_decode(queue, str(r[0]), data, err, float(r[1])))
        out.append((letters, len(rows)))  # rows read: a short read was the last chunk
    return out


def _letters(
    client: redis.Redis, items: list[tuple[str, str, float]]
) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """(queue, id) -> (message, error) for (queue, id, score) items, in one round trip."""
    if not items:
        return {}
    by_queue: dict[str, list[tuple[str, float]]] = {}
    for queue, rid, score in items:
        by_queue.setdefault(queue, []).append((rid, score))
    # errors: one HMGET per day hash, each with just the ids that may be in it
    by_key: dict[str, list[str]] = {}
    for queue, entries in by_queue.items():
        for rid, score in entries:
            for key in dead_errors_keys(queue, score):
                by_key.setdefault(key, []).append(rid)
    pipe = client.pipeline(transaction=False)
    for queue, entries in by_queue.items():
        pipe.hmget(_key(f"{queue}.XQ.msgs"), [rid for rid, _ in entries])
    for key, ids in by_key.items():
        pipe.hmget(key, ids)
    results = pipe.execute()
    errors: dict[tuple[str, str], str] = {}
    for (key, ids), values in zip(by_key.items(), results[len(by_queue) :], strict=True):
        queue = key[len(DEAD_ERRORS_PREFIX) :].rsplit(":", 1)[0]
        for rid, value in zip(ids, values, strict=True):
            if value is not None:
                errors[(queue, rid)] = value
    found: dict[tuple[str, str], tuple[str | None, str | None]] = {}
    for (queue, entries), datas in zip(by_queue.items(), results, strict=False):
        for (rid, _), data in zip(entries, datas, strict=True):
            found[(queue, rid)] = (data, errors.get((queue, rid)))
    return found


def _walk_queue(
    client: redis.Redis,
    queue: str,
    upper: str,
    first: tuple[list[DeadLetter], int],
    first_size: int,
) -> Iterator[DeadLetter]:
    """One queue's dead letters, newest first, starting with its prefetched first chunk."""
    letters, read = first
    yield from letters
    offset, size = first_size, first_size
    while read >= size:  # a short read was the last chunk
        [(letters, read)] = _chunks(client, [queue], upper, [offset], CHUNK)
        yield from letters
        offset, size = offset + read, CHUNK


def walk(
    client: redis.Redis,
    queues: Iterable[str],
    *,
    before: float | None = None,
    first_chunk: int = CHUNK,
) -> Iterator[DeadLetter]:
    """Dead letters of all `queues`, merged newest first (strictly older than `before`)."""
    names = list(queues)
    upper = f"({before!r}" if before is not None else "+inf"
    firsts = _chunks(client, names, upper, [0] * len(names), first_chunk)
    walkers = [
        _walk_queue(client, q, upper, first, first_chunk)
        for q, first in zip(names, firsts, strict=True)
    ]
    return heapq.merge(*walkers, key=lambda d: -d.score)


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: strictly after this (score, queue, id) in page order (newest
    score first, then queue name, then id descending as Redis orders equal scores). Many
    letters die in the same millisecond, so the score alone cannot be the cursor of an
    unfiltered page. A filtered page ends between two scores and needs the score only."""

    score: float
    queue: str = ""
    rid: str = ""

    def encode(self) -> str:
        return f"{self.score!r}:{self.queue}:{self.rid}" if self.queue else repr(self.score)

    @classmethod
    def decode(cls, raw: str) -> Cursor:
        """Raises ValueError on anything but ``SCORE`` or ``SCORE:QUEUE:ID``."""
        parts = raw.split(":", 2)
        score = float(parts[0])
        if len(parts) == 1:
            return cls(score)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ValueError(f"bad cursor {raw[:40]!r}")
        return cls(score, parts[1], parts[2])

    def before(self, score: float, queue: str, rid: str) -> bool:
        """Whether (score, queue, rid) comes after this cursor in page order."""
        if score != self.score:
            return score < self.score
        if not self.queue:
            return False
        return queue > self.queue or (queue == self.queue and rid < self.rid)


@dataclass
class DeadPage:
    letters: list[DeadLetter]
    next_cursor: str | None  # None at the end
    scanned: int
    budget_hit: bool


def dead_page(
    client: redis.Redis,
    queues: list[str],
    flt: DeadFilter,
    *,
    cursor: Cursor | None = None,
    limit: int = 50,
    scan_budget: int = 20_000,
) -> DeadPage:
    """A page of dead letters matching `flt`, newest first. A filtered page reads at most
    `scan_budget` letters and then offers to continue from where it stopped."""
    chosen = [flt.queue] if flt.queue else queues
    if flt.empty:
        return _newest_page(client, chosen, cursor=cursor, limit=limit)
    letters: list[DeadLetter] = []
    scanned = 0
    last_score: float | None = None
    source = walk(client, chosen, before=cursor.score if cursor else None)
    for letter in source:
        if last_score is not None:
            # A page ends between two scores only, so the score-only cursor skips nothing.
            boundary = letter.score != last_score
            if (boundary and len(letters) >= limit) or len(letters) >= limit + MAX_PAGE_EXTENSION:
                return DeadPage(letters, Cursor(last_score).encode(), scanned, False)
            if boundary and scanned >= scan_budget:
                return DeadPage(letters, Cursor(last_score).encode(), scanned, True)
        scanned += 1
        last_score = letter.score
        if flt.matches(letter):
            letters.append(letter)
    return DeadPage(letters, None, scanned, False)


def _newest_page(
    client: redis.Redis, queues: list[str], *, cursor: Cursor | None, limit: int
) -> DeadPage:
    """An unfiltered page in a few pipelined round trips whatever the queues: ids and scores
    of each queue's newest letters after the cursor, merged; then the messages and errors of
    the chosen ones only."""
    size = limit + 1
    upper = "+inf"
    skip = [0] * len(queues)
    if cursor is not None:
        # equal scores: fetch inclusively, enough to step over the ones already shown
        upper = repr(cursor.score)
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            pipe.zcount(_key(f"{queue}.XQ"), upper, upper)
        skip = [int(n) for n in pipe.execute()]
    pipe = client.pipeline(transaction=False)
    for queue, extra in zip(queues, skip, strict=True):
        pipe.zrevrangebyscore(
            _key(f"{queue}.XQ"), upper, "-inf", start=0, num=size + extra, withscores=True
        )
    ranges: list[list[Any]] = pipe.execute()
    entries = [
        (float(r[1]), queue, str(r[0]))
        for queue, rows in zip(queues, ranges, strict=True)
        for r in rows
        if cursor is None or cursor.before(float(r[1]), queue, str(r[0]))
    ]
    entries.sort(key=lambda e: e[2], reverse=True)  # stable sorts: id descending within …
    entries.sort(key=lambda e: (-e[0], e[1]))  # … newest score first, then queue name
    page = entries[:limit]
    if not page:
        return DeadPage([], None, 0, False)
    found = _letters(client, [(queue, rid, score) for score, queue, rid in page])
    letters = [
        _decode(queue, rid, data, err, score)
        for score, queue, rid in page
        for data, err in [found[(queue, rid)]]
        if data is not None  # retried or deleted between the two reads
    ]
    last = page[-1]
    more = len(entries) > len(page)
    return DeadPage(letters, Cursor(*last).encode() if more else None, len(page), False)


def select_all(client: redis.Redis, queues: list[str], flt: DeadFilter) -> list[tuple[str, str]]:
    """(queue, redis id) of every dead letter matching `flt`: the exact set a bulk action
    will act on."""
    chosen = [flt.queue] if flt.queue else queues
    return [(d.queue, d.redis_id) for d in walk(client, chosen) if flt.matches(d)]


def _claim(
    client: redis.Redis, items: list[tuple[str, str]]
) -> list[tuple[str, str, str, str | None, float]]:
    """Atomically take dead letters out of their sets: (queue, id, message, error, score) for
    each one this call removed. Two operators retrying the same letter: one of them gets it."""
    claimed = []
    for start in range(0, len(items), CHUNK):
        batch = items[start : start + CHUNK]
        pipe = client.pipeline(transaction=False)
        for queue, rid in batch:
            pipe.zscore(_key(f"{queue}.XQ"), rid)
        scores = pipe.execute()
        present = [(q, rid, float(sc)) for (q, rid), sc in zip(batch, scores, strict=True) if sc]
        if not present:
            continue
        pipe = client.pipeline(transaction=True)
        for queue, rid, score in present:
            keys = dead_errors_keys(queue, score)
            pipe.hget(_key(f"{queue}.XQ.msgs"), rid)
            pipe.hget(keys[0], rid)
            pipe.hget(keys[1], rid)
            pipe.zrem(_key(f"{queue}.XQ"), rid)
            pipe.hdel(_key(f"{queue}.XQ.msgs"), rid)
            pipe.hdel(keys[0], rid)
            pipe.hdel(keys[1], rid)
        results = pipe.execute()
        for i, (queue, rid, score) in enumerate(present):
            data, today, next_day, removed = results[7 * i : 7 * i + 4]
            if removed and data is not None:
                claimed.append((queue, rid, str(data), today or next_day, score))
    return claimed


def _restore(
    client: redis.Redis, queue: str, rid: str, data: str, error: str | None, score: float
) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.zadd(_key(f"{queue}.XQ"), {rid: score})
    pipe.hset(_key(f"{queue}.XQ.msgs"), rid, data)
    if error:
        pipe.hset(dead_errors_keys(queue, score)[0], rid, error)
    pipe.execute()


def delete(client: redis.Redis, items: list[tuple[str, str]]) -> int:
    """Remove dead letters; returns how many were still there."""
    return len(_claim(client, items))


def _revived(data: str, queue: str) -> Any:
    """The message to enqueue again; ValueError/KeyError/TypeError if the letter is unreadable."""
    from dramatiq import Message

    old = json.loads(data)
    options = {
        k: v
        for k, v in (old.get("options") or {}).items()
        if k not in {"redis_message_id", "eta", "traceback", "retries", "requeue_timestamp"}
    }
    return Message(
        queue_name=q_name(old.get("queue_name") or queue),
        actor_name=old["actor_name"],
        args=tuple(old.get("args") or ()),
        kwargs=old.get("kwargs") or {},
        options=options,
        message_id=old["message_id"],
        message_timestamp=int(time.time() * 1000),
    )


def retry(client: redis.Redis, items: list[tuple[str, str]], *, broker: Any) -> int:
    """Move dead letters back onto their queues through the broker; returns how many moved.

    The message keeps its id (duplicates stay recognisable) but starts a fresh retry budget and
    a fresh timestamp, or the age limit would drop a letter that waited longer than it. A letter
    is never lost: an unreadable one goes back to the dead set; if the broker fails, the letter
    being moved and every claimed one after it go back, and RetryFailed says how many moved and
    which were not tried.
    """
    moved = 0
    for start in range(0, len(items), CHUNK):
        try:
            claimed = _claim(client, items[start : start + CHUNK])
        except Exception as exc:  # the claim is one transaction: this chunk was not taken
            raise RetryFailed(moved=moved, remaining=items[start:], error=exc) from exc
        for i, (queue, rid, data, error, score) in enumerate(claimed):
            try:
                message = _revived(data, queue)
            except (ValueError, KeyError, TypeError):
                log.warning("dead_letter_unreadable", queue=queue, redis_id=rid)
                _restore(client, queue, rid, data, error, score)
                continue
            try:
                broker.enqueue(message)
            except Exception as exc:
                for rest in claimed[i:]:
                    _restore(client, *rest)
                remaining = [(q, r) for q, r, *_ in claimed[i:]] + items[start + CHUNK :]
                raise RetryFailed(moved=moved, remaining=remaining, error=exc) from exc
            moved += 1
    return moved


__all__ = [
    "STATS_PREFIX",
    "BrokerUnavailable",
    "DeadFilter",
    "DeadLetter",
    "DeadPage",
    "QueueStats",
    "RetryFailed",
    "broker_redis",
    "dead_page",
    "delete",
    "live_workers",
    "per_minute",
    "queue_names",
    "queue_stats",
    "retry",
    "select_all",
    "walk",
]
