"""Names shared by the queue round-trip bench and its two worker modules.

Kept apart from the worker modules because importing those sets the global dramatiq broker
(and, for tidemill's, reads settings from the environment), which the bench process must not do.
"""

from __future__ import annotations

#: dramatiq's Redis broker prefixes every key with this namespace.
NAMESPACE = "dramatiq"

#: Bare dramatiq: its own queue, on Redis database 1.
BARE_QUEUE = "bench_bare"
BARE_ACTOR = "bench_bare_noop"
BARE_REDIS_DB = 1
#: The bare worker module reads its broker URL from this variable.
BARE_BROKER_URL_ENV = "BENCH_BARE_BROKER_URL"

#: tidemill: its own queue, on Redis database 0 (REDIS_URL, as tidemill's worker uses).
TIDEMILL_QUEUE = "bench_tidemill"
TIDEMILL_ACTOR = "bench_tidemill_noop"
TIDEMILL_REDIS_DB = 0
