"""One profile per seed app (``apps/<name>/``): which of the app's tables and columns stand for
tidemill's flows. ``TIDEMILL_APP`` picks the one a process serves (default lovendo)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from core.settings import Settings, get_settings

if TYPE_CHECKING:
    from apps.profile import Profile

NAMES: tuple[str, ...] = ("lovendo", "bilten", "perfect_match", "saltbitter", "pomi")


class UnknownApp(LookupError):
    """A name with no profile under apps/."""


def get_profile(name: str) -> Profile:
    if name not in NAMES:
        raise UnknownApp(f"no app profile {name!r}; known: {', '.join(NAMES)}")
    module = importlib.import_module(f"apps.{name}")
    profile: Profile = module.PROFILE
    return profile


def active_profile(settings: Settings | None = None) -> Profile:
    """The profile of the app this process serves (``TIDEMILL_APP``)."""
    return get_profile((settings or get_settings()).app)


def all_profiles() -> list[Profile]:
    return [get_profile(n) for n in NAMES]
