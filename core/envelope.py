"""Envelope encryption (AES-256-GCM) for objects at rest, streamed in chunks.

Every object gets its own random 256-bit data key; the data key is wrapped (AES-GCM) by a
master key from settings, and the master key's id (a fingerprint, never the key) is recorded
in the object's header, so a reader knows which key to ask for and a rotated key keeps old
objects readable (``TIDEMILL_ENCRYPTION_OLD_KEYS``).

Layout::

    MAGIC(6) | key_id(8) | wrap_nonce(12) | wrapped_data_key(48) | nonce_prefix(8)   = header
    chunk 0 | chunk 1 | ... | chunk n      each = AES-GCM(plain[<= CHUNK_SIZE]) + tag(16)

Every chunk but the last holds exactly ``CHUNK_SIZE`` plaintext bytes; a chunk's nonce is
``nonce_prefix || counter`` and its associated data is ``header || counter || final`` (the
STREAM construction): reordered, dropped, appended or cut-off chunks fail authentication, and
so does a stream cut exactly at a chunk boundary (its last chunk was sealed as non-final).
An empty object is one final chunk of zero bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"TMENC\x01"
CHUNK_SIZE = 1024 * 1024
TAG = 16
KEY_ID_LEN = 8
HEADER_LEN = len(MAGIC) + KEY_ID_LEN + 12 + 48 + 8


class EnvelopeError(Exception):
    """An encrypted object cannot be decrypted: wrong or missing key, or damaged bytes."""


def parse_key(text: str) -> bytes:
    """A master key from settings: base64 (standard or url-safe) of exactly 32 bytes."""
    raw = text.strip()
    raw += "=" * (-len(raw) % 4)
    try:
        if "-" in raw or "_" in raw:
            key = base64.urlsafe_b64decode(raw)
        else:
            key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(
            "encryption key is not base64 (make one: openssl rand -base64 32)"
        ) from None
    if len(key) != 32:
        raise EnvelopeError(
            f"encryption key is {len(key)} bytes; AES-256 needs 32 (openssl rand -base64 32)"
        )
    return key


def key_id(key: bytes) -> bytes:
    """A fingerprint naming the key in object headers (safe to store and to log)."""
    return hashlib.sha256(b"tidemill-key-id\0" + key).digest()[:KEY_ID_LEN]


class Keyring:
    """The current master key (encrypts) and older ones (still decrypt), by key id."""

    def __init__(self, current: bytes, old: Iterable[bytes] = ()) -> None:
        self.current = current
        self.current_id = key_id(current)
        self._keys = {key_id(k): k for k in (*old, current)}

    @classmethod
    def from_text(cls, current: str, old: str | None = None) -> Keyring:
        olds = [parse_key(part) for part in (old or "").split(",") if part.strip()]
        return cls(parse_key(current), olds)

    def get(self, kid: bytes) -> bytes:
        try:
            return self._keys[kid]
        except KeyError:
            raise EnvelopeError(
                f"object is encrypted with key {kid.hex()}, which is not configured (current "
                f"key is {self.current_id.hex()}; add the old key to "
                "TIDEMILL_ENCRYPTION_OLD_KEYS)"
            ) from None


def is_encrypted(head: bytes) -> bool:
    return head.startswith(MAGIC)


def _chunk_aad(header: bytes, counter: int, final: bool) -> bytes:
    return header + struct.pack(">IB", counter, 1 if final else 0)


class Encryptor:
    """Feed plaintext with ``update``; bytes to store come back; ``finish`` seals the end."""

    def __init__(self, keyring: Keyring) -> None:
        data_key = AESGCM.generate_key(bit_length=256)
        wrap_nonce = os.urandom(12)
        wrapped = AESGCM(keyring.current).encrypt(wrap_nonce, data_key, keyring.current_id)
        self._prefix = os.urandom(8)
        self.header = MAGIC + keyring.current_id + wrap_nonce + wrapped + self._prefix
        self._aead = AESGCM(data_key)
        self._buffer = bytearray()
        self._counter = 0
        self._started = False

    def _seal(self, plain: bytes, final: bool) -> bytes:
        nonce = self._prefix + struct.pack(">I", self._counter)
        sealed = self._aead.encrypt(nonce, plain, _chunk_aad(self.header, self._counter, final))
        self._counter += 1
        return sealed

    def update(self, data: bytes) -> bytes:
        out = bytearray()
        if not self._started:
            out += self.header
            self._started = True
        self._buffer += data
        # Keep at least one byte back: the last chunk must be sealed as final in finish().
        while len(self._buffer) > CHUNK_SIZE:
            out += self._seal(bytes(self._buffer[:CHUNK_SIZE]), final=False)
            del self._buffer[:CHUNK_SIZE]
        return bytes(out)

    def finish(self) -> bytes:
        out = b"" if self._started else self.header
        self._started = True
        out += self._seal(bytes(self._buffer), final=True)
        self._buffer.clear()
        return out


class DecryptingReader:
    """A file-like ``read()`` over a stored encrypted stream; raises EnvelopeError on any
    damage (a flipped byte, a cut-off end, a wrong key) before handing out the bad chunk."""

    def __init__(self, raw: object, keyring: Keyring | None, *, name: str = "object") -> None:
        self._raw = raw
        self._name = name
        header = self._read_exact(HEADER_LEN)
        if len(header) < HEADER_LEN or not header.startswith(MAGIC):
            raise EnvelopeError(f"{name}: not an encrypted object, or its header is cut off")
        if keyring is None:
            raise EnvelopeError(
                f"{name} is encrypted (key {header[6:14].hex()}); set TIDEMILL_ENCRYPTION_KEY"
            )
        self.header = header
        kid = header[6:14]
        try:
            master = keyring.get(kid)
        except EnvelopeError as exc:
            raise EnvelopeError(f"{name}: {exc}") from None
        wrap_nonce, wrapped, self._prefix = header[14:26], header[26:74], header[74:82]
        try:
            data_key = AESGCM(master).decrypt(wrap_nonce, wrapped, kid)
        except InvalidTag:
            raise EnvelopeError(f"{name}: its data key does not unwrap (damaged header)") from None
        self._aead = AESGCM(data_key)
        self._counter = 0
        self._pending = self._read_exact(CHUNK_SIZE + TAG)
        self._out = b""
        self._pos = 0
        self._done = False

    def _read_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = self._raw.read(n - got)  # type: ignore[attr-defined]
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _next_chunk(self) -> bytes | None:
        if self._done:
            return None
        sealed = self._pending
        following = self._read_exact(CHUNK_SIZE + TAG) if len(sealed) == CHUNK_SIZE + TAG else b""
        final = not following
        nonce = self._prefix + struct.pack(">I", self._counter)
        try:
            plain = self._aead.decrypt(nonce, sealed, _chunk_aad(self.header, self._counter, final))
        except InvalidTag:
            raise EnvelopeError(
                f"{self._name}: chunk {self._counter} fails authentication (the object is "
                "damaged or cut off)"
            ) from None
        self._counter += 1
        self._pending = following
        self._done = final
        return plain

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._out[self._pos :]]
            self._out, self._pos = b"", 0
            while (chunk := self._next_chunk()) is not None:
                parts.append(chunk)
            return b"".join(parts)
        while self._pos >= len(self._out):
            chunk = self._next_chunk()
            if chunk is None:
                return b""
            self._out, self._pos = chunk, 0
        data = self._out[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


def encrypt_bytes(keyring: Keyring, data: bytes) -> bytes:
    enc = Encryptor(keyring)
    return enc.update(data) + enc.finish()


def decrypt_bytes(keyring: Keyring | None, data: bytes, *, name: str = "object") -> bytes:
    import io

    return DecryptingReader(io.BytesIO(data), keyring, name=name).read()
