"""Actor family: lifecycle (being built)."""
