"""Entry points: the `tidemill` command and the `up` supervisor.

The top room: it may import every other room, and no room imports it."""
