"""tidemill: the same no-op actor, declared with tidemill's own ``actor`` decorator.

Importing ``workers.base`` builds tidemill's broker from the environment, so the whole stack
runs: log context, Prometheus, age and time limits, retries, the unit of work and its commit.
Worker: ``python -m cli.main worker bench.noop_tidemill --processes 1 --threads 8``.
"""

from __future__ import annotations

from bench.noop_names import TIDEMILL_ACTOR, TIDEMILL_QUEUE
from db.engine import UnitOfWork
from workers.base import actor


@actor(queue_name=TIDEMILL_QUEUE, actor_name=TIDEMILL_ACTOR)
def bench_tidemill_noop(uow: UnitOfWork) -> None:
    """Does nothing; the decorator still opens and commits the message's unit of work."""
