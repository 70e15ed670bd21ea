"""The webhook bench's no-op baseline: a Python web endpoint with no work behind it.

    python -m bench.noop_web --host 127.0.0.1 --port PORT

Starlette on uvicorn, one process, started with the same ``uvicorn.run`` arguments as
``python -m cli.main web``. ``POST /webhooks/stripe`` reads the body and answers 200
``{"received": true}``: no signature check, no JSON parsing, no database, no log line.
Imports nothing from tidemill, so the baseline pays none of its import-time set-up either.
(tidemill's server sends the webhook path past Starlette's router and middleware,
``web.app.Front``; this endpoint keeps them: ~20 us per request here.)
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

PATH = "/webhooks/stripe"  # web.webhooks.PATH, repeated so this module imports no tidemill code


async def receive(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"received": True})


app = Starlette(routes=[Route(PATH, receive, methods=["POST"])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.noop_web", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # The same arguments as `cli.main web`: one process, no access log, tidemill's shutdown grace.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
