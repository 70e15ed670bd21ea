"""A local HTTP server speaking Expo's push API (the parts tidemill uses).

POST /--/api/v2/push/send: a JSON array of up to 100 messages -> ``{"data": [ticket, …]}``;
a token in ``dead_at_send`` gets an error ticket (DeviceNotRegistered), as Expo answers for an
uninstalled app; others an ok ticket with an id. POST /--/api/v2/push/getReceipts with
``{"ids": […]}`` -> ``{"data": {id: receipt}}``; tickets of tokens in ``dead_at_receipt`` get
an error receipt. More than 100 messages in one request answers Expo's request-level error.
Send requests whose 1-based number is in ``fail_requests`` answer HTTP 500 (nothing recorded).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class ExpoServer:
    url: str = ""
    dead_at_send: set[str] = field(default_factory=set)
    dead_at_receipt: set[str] = field(default_factory=set)
    fail_requests: set[int] = field(default_factory=set)  # send request numbers answering 500
    send_attempts: int = 0
    sent: list[dict[str, Any]] = field(default_factory=list)  # every message received
    requests: list[int] = field(default_factory=list)  # messages per send request
    tickets: dict[str, str] = field(default_factory=dict)  # ticket id -> token
    receipt_requests: list[list[str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tokens_sent(self) -> list[str]:
        with self.lock:
            return [m["to"] for m in self.sent]


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_POST(self) -> None:
        expo: ExpoServer = self.server.expo
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length) or b"null")
        if self.path == "/--/api/v2/push/send":
            messages = payload if isinstance(payload, list) else [payload]
            if len(messages) > 100:
                self._answer(
                    400,
                    {"errors": [{"code": "PUSH_TOO_MANY_NOTIFICATIONS", "message": "max 100"}]},
                )
                return
            with expo.lock:
                expo.send_attempts += 1
                failing = expo.send_attempts in expo.fail_requests
            if failing:
                self._answer(500, {"errors": [{"code": "INTERNAL_SERVER_ERROR", "message": "x"}]})
                return
            data = []
            with expo.lock:
                expo.requests.append(len(messages))
                for message in messages:
                    expo.sent.append(message)
                    token = message["to"]
                    if token in expo.dead_at_send:
                        data.append(
                            {
                                "status": "error",
                                "message": f'"{token}" is not a registered push notification '
                                "recipient",
                                "details": {"error": "DeviceNotRegistered"},
                            }
                        )
                    else:
                        ticket = str(uuid.uuid4())
                        expo.tickets[ticket] = token
                        data.append({"status": "ok", "id": ticket})
            self._answer(200, {"data": data})
        elif self.path == "/--/api/v2/push/getReceipts":
            ids = list(payload.get("ids") or [])
            receipts: dict[str, Any] = {}
            with expo.lock:
                expo.receipt_requests.append(ids)
                for tid in ids:
                    token = expo.tickets.get(tid)
                    if token is None:
                        continue  # unknown or not yet available: Expo leaves it out
                    if token in expo.dead_at_receipt:
                        receipts[tid] = {
                            "status": "error",
                            "message": "The device cannot receive push notifications anymore",
                            "details": {"error": "DeviceNotRegistered"},
                        }
                    else:
                        receipts[tid] = {"status": "ok"}
            self._answer(200, {"data": receipts})
        else:
            self._answer(404, {"errors": [{"code": "NOT_FOUND", "message": self.path}]})

    def _answer(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def expo_server() -> Iterator[ExpoServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    expo = ExpoServer(url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.expo = expo  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield expo
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
