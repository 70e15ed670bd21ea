"""Data lifecycle: retention policies as data, the engine, archive, purge, partitions, GDPR."""
