"""Every actor family; the worker processes and the relay import this one module."""

from workers import cache, outbox, payments

__all__ = ["cache", "outbox", "payments"]
