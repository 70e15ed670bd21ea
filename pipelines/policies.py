"""Retention policies as data (issue #5 replaces this stub; the interface below is fixed).

``load_policies(settings)`` returns every policy; each has at least ``name``, ``schedule``
(five-field crontab), ``timezone``, ``misfire`` ("once" or "skip") and ``misfire_grace_s``.
The pipeline actor is ``workers.lifecycle.run_pipeline(name, tick=None)`` on queue "pipelines".
"""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import Settings


@dataclass(frozen=True)
class Policy:
    name: str
    schedule: str
    timezone: str = "UTC"
    misfire: str = "once"
    misfire_grace_s: int = 3600


def load_policies(settings: Settings | None = None) -> list[Policy]:
    return []
