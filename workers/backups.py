"""Actor family: backups (being built)."""
