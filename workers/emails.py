"""Actor family: emails (being built)."""
