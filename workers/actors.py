"""Every actor family; the worker processes and the relay import this one module."""

from workers import cache, outbox

__all__ = ["cache", "outbox"]
