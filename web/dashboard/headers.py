"""Security headers for the admin UI (OWASP's HTTP headers cheat sheet), as ASGI middleware so
every response carries them: pages, redirects, refusals, static files and the favicon."""

from __future__ import annotations

from typing import Any

# the dashboard loads its own script and stylesheet only; forms post to itself; nothing may
# frame it (clickjacking of the retry and pause buttons)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
DASHBOARD = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
# authenticated pages carry CSRF tokens and operational data: never stored by a cache
NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]


class SecurityHeaders:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        extra = list(COMMON)
        if path.startswith("/dashboard") or path == "/favicon.ico":
            extra += DASHBOARD
            if not path.startswith("/dashboard/static") and path != "/favicon.ico":
                extra += NO_STORE

        ours = {k for k, _ in extra}

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                # ours win over whatever a handler set (a header is never sent twice)
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in ours]
                message = {**message, "headers": kept + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)
