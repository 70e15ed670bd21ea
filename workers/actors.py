"""Every actor family; the worker processes and the relay import this one module."""

from workers import apps, backups, cache, emails, lifecycle, notifications, outbox, payments

__all__ = ["apps", "backups", "cache", "emails", "lifecycle", "notifications", "outbox", "payments"]
