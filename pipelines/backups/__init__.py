"""Backups: logical and physical, WAL, verify, restore, the drill, retention of backups."""
