"""Bare dramatiq: a RedisBroker with dramatiq's default middleware and one no-op actor.

Worker: ``python -m dramatiq bench.noop_bare --processes 1 --threads 8`` with
``BENCH_BARE_BROKER_URL`` set. Imports nothing from tidemill.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.noop_names import BARE_ACTOR, BARE_BROKER_URL_ENV, BARE_QUEUE

broker = RedisBroker(url=os.environ[BARE_BROKER_URL_ENV])
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=BARE_QUEUE, actor_name=BARE_ACTOR)
def bench_bare_noop() -> None:
    """Does nothing: the message round trip is the whole cost."""
