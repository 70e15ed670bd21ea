"""The web app on a real uvicorn server in a background thread, for tests that speak HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from core.log import configure_logging
from core.proc import free_port, wait_until
from core.settings import Settings


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """create_app(settings) served on a free loopback port; yields its base URL."""
    # imported here: a worker process importing a test module for its actors must not import
    # prometheus_client before dramatiq's middleware has pointed it at the multiprocess dir
    from web.app import create_app

    configure_logging(env=settings.env, level=settings.log_level)  # no-op once configured
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_config=None, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=30, alive=thread.is_alive)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
