"""The durability bench's actor: one effect row per run, with no unique key on purpose, so a
job applied twice shows as a doubled effect (nothing but the done-marking stops it).

Worker: ``python -m cli.main worker bench.durability_actor --queue bench_durable``.
"""

from __future__ import annotations

from bench.durability import ACTOR, QUEUE
from db.engine import UnitOfWork
from workers.base import actor


@actor(queue_name=QUEUE, actor_name=ACTOR)
def bench_durable_effect(uow: UnitOfWork, job: int) -> None:
    uow.sql("INSERT INTO bench_effects (job) VALUES (%(job)s)", {"job": job})
