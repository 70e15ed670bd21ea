"""Push transports shaped after Expo's push API, built from ``PUSH_URL``.

``POST {base}/--/api/v2/push/send`` takes up to 100 messages and answers one ticket per
message, in order: ``{"status": "ok", "id": …}`` or ``{"status": "error", "details":
{"error": "DeviceNotRegistered"}}``. ``POST {base}/--/api/v2/push/getReceipts`` with ticket ids
answers the delivery receipts later, with the same error codes. ``log://`` (the development
default) logs how many messages it would send and answers ok tickets.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.log import get_logger
from core.settings import Settings, SettingsError, get_settings

log = get_logger(__name__)

SEND_PATH = "/--/api/v2/push/send"
RECEIPTS_PATH = "/--/api/v2/push/getReceipts"
MAX_MESSAGES = 100  # Expo's limit per send request
MAX_RECEIPT_IDS = 1000  # Expo's limit per getReceipts request
DEVICE_NOT_REGISTERED = "DeviceNotRegistered"
# The error of a ticket whose send request as a whole failed (HTTP error, unreachable, refused).
REQUEST_FAILED = "RequestFailed"


class PushError(Exception):
    """The push service could not be reached or refused the whole request (retry later)."""


@dataclass(frozen=True)
class PushMessage:
    to: str  # ExponentPushToken[…]
    title: str
    body: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"to": self.to, "title": self.title, "sound": "default"}
        if self.body:
            out["body"] = self.body
        if self.data:
            out["data"] = self.data
        return out


@dataclass(frozen=True)
class PushTicket:
    token: str
    ok: bool
    id: str | None = None  # ticket id, for the receipt
    error: str | None = None  # e.g. DeviceNotRegistered, MessageRateExceeded


@dataclass(frozen=True)
class PushReceipt:
    ticket_id: str
    ok: bool
    error: str | None = None


class PushTransport(Protocol):
    # whether delivery receipts exist to be fetched later (Expo: yes; the log transport: no)
    has_receipts: bool

    def send(self, messages: Sequence[PushMessage]) -> list[PushTicket]: ...

    def receipts(self, ticket_ids: Sequence[str]) -> dict[str, PushReceipt]: ...


class LogPush:
    """Development default: nothing leaves the machine; counts only (tokens are personal)."""

    has_receipts = False

    def send(self, messages: Sequence[PushMessage]) -> list[PushTicket]:
        if messages:
            log.info("push_logged", messages=len(messages))
        return [PushTicket(token=m.to, ok=True, id=f"log-{uuid.uuid4()}") for m in messages]

    def receipts(self, ticket_ids: Sequence[str]) -> dict[str, PushReceipt]:
        return {tid: PushReceipt(ticket_id=tid, ok=True) for tid in ticket_ids}


class ExpoPush:
    has_receipts = True

    def __init__(
        self, base_url: str, *, access_token: str | None = None, timeout: float = 30.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.timeout = timeout

    def send(self, messages: Sequence[PushMessage]) -> list[PushTicket]:
        """One ticket per message, in order. A request that fails as a whole (HTTP error,
        unreachable, refused) gives its messages ``REQUEST_FAILED`` tickets and is logged; the
        other requests still go, so their tickets (DeviceNotRegistered, ok ids for receipts)
        are not lost with it."""
        tickets: list[PushTicket] = []
        for start in range(0, len(messages), MAX_MESSAGES):
            chunk = messages[start : start + MAX_MESSAGES]
            try:
                tickets.extend(self._send_chunk(chunk))
            except PushError as exc:
                log.warning("push_request_failed", messages=len(chunk), error=str(exc)[:200])
                tickets.extend(
                    PushTicket(token=m.to, ok=False, error=REQUEST_FAILED) for m in chunk
                )
        return tickets

    def _send_chunk(self, chunk: Sequence[PushMessage]) -> list[PushTicket]:
        answer = self._post(SEND_PATH, [m.as_json() for m in chunk])
        data = answer.get("data")
        if not isinstance(data, list) or len(data) != len(chunk):
            raise PushError(f"push service answered {len(data or [])} tickets for {len(chunk)}")
        tickets: list[PushTicket] = []
        for message, ticket in zip(chunk, data, strict=True):
            if ticket.get("status") == "ok":
                tickets.append(PushTicket(token=message.to, ok=True, id=ticket.get("id")))
            else:
                error = (ticket.get("details") or {}).get("error") or "unknown"
                tickets.append(PushTicket(token=message.to, ok=False, error=error))
        return tickets

    def receipts(self, ticket_ids: Sequence[str]) -> dict[str, PushReceipt]:
        out: dict[str, PushReceipt] = {}
        for start in range(0, len(ticket_ids), MAX_RECEIPT_IDS):
            chunk = list(ticket_ids[start : start + MAX_RECEIPT_IDS])
            data = self._post(RECEIPTS_PATH, {"ids": chunk}).get("data") or {}
            for tid, receipt in data.items():
                ok = receipt.get("status") == "ok"
                error = None if ok else (receipt.get("details") or {}).get("error") or "unknown"
                out[tid] = PushReceipt(ticket_id=tid, ok=ok, error=error)
        return out

    def _post(self, path: str, payload: Any) -> dict[str, Any]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
        }
        if self.access_token:
            headers["Authorization"] = f"Bearer {self.access_token}"
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(payload).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            raise PushError(f"push service answered HTTP {exc.code} for {path}") from None
        except (OSError, ValueError) as exc:
            raise PushError(f"push service unreachable at {self.base_url}: {exc}") from None
        if not isinstance(answer, dict):
            raise PushError("push service answered something that is not a JSON object")
        if answer.get("errors"):
            # request-level errors (e.g. too many messages, bad access token)
            raise PushError(f"push service refused the request: {answer['errors']!r}"[:300])
        return answer


def open_push(url: str | None = None, *, settings: Settings | None = None) -> PushTransport:
    settings = settings or get_settings()
    url = url or settings.push_url or "log://"
    scheme = url.partition("://")[0]
    if scheme == "log":
        return LogPush()
    if scheme in {"http", "https"}:
        return ExpoPush(url, access_token=settings.push_access_token)
    raise SettingsError(f"PUSH_URL={url!r}: unsupported scheme {scheme!r} (https://, log://)")
