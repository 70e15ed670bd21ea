"""Actor family: notifications (being built)."""
