"""Envelope encryption (core/envelope.py) under generated inputs: any content written in any
split round-trips; any single flipped bit, any cut, any appended byte, a wrong key is refused."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core import envelope
from core.envelope import (
    DecryptingReader,
    Encryptor,
    EnvelopeError,
    Keyring,
    decrypt_bytes,
    encrypt_bytes,
    parse_key,
)

KEY = Keyring(os.urandom(32))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64-byte chunks: generated inputs cross many chunk boundaries cheaply
    monkeypatch.setattr(envelope, "CHUNK_SIZE", 64)


@hsettings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=700), splits=st.lists(st.integers(0, 700), max_size=8))
def test_any_content_in_any_split_round_trips(data: bytes, splits: list[int]) -> None:
    enc = Encryptor(KEY)
    out = bytearray()
    last = 0
    for cut in sorted(min(s, len(data)) for s in splits):
        out += enc.update(data[last:cut])
        last = cut
    out += enc.update(data[last:]) + enc.finish()
    reader = DecryptingReader(io.BytesIO(bytes(out)), KEY)
    got = bytearray()
    while chunk := reader.read(37):
        got += chunk
    assert bytes(got) == data


@hsettings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=400), where=st.integers(0, 10_000), bit=st.integers(0, 7)
)
def test_any_flipped_bit_is_refused(data: bytes, where: int, bit: int) -> None:
    sealed = bytearray(encrypt_bytes(KEY, data))
    sealed[where % len(sealed)] ^= 1 << bit
    with pytest.raises(EnvelopeError):
        decrypt_bytes(KEY, bytes(sealed))


@hsettings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), keep=st.integers(0, 10_000), extra=st.binary(max_size=80))
def test_any_cut_or_appended_tail_is_refused(data: bytes, keep: int, extra: bytes) -> None:
    sealed = encrypt_bytes(KEY, data)
    cut = sealed[: keep % len(sealed)]
    with pytest.raises(EnvelopeError):
        decrypt_bytes(KEY, cut)
    if extra:
        with pytest.raises(EnvelopeError):
            decrypt_bytes(KEY, sealed + extra)


def test_wrong_key_missing_key_and_rotation() -> None:
    old, new = os.urandom(32), os.urandom(32)
    sealed = encrypt_bytes(Keyring(old), b"personal data" * 20)
    with pytest.raises(EnvelopeError, match="not configured"):
        decrypt_bytes(Keyring(new), sealed, name="backups/x")
    with pytest.raises(EnvelopeError, match="TIDEMILL_ENCRYPTION_KEY"):
        decrypt_bytes(None, sealed)
    assert decrypt_bytes(Keyring(new, [old]), sealed) == b"personal data" * 20
    # new objects are sealed with the current key
    assert Keyring(new, [old]).current_id in encrypt_bytes(Keyring(new, [old]), b"x")[:20]


def test_key_parsing_is_strict() -> None:
    import base64

    raw = os.urandom(32)
    assert parse_key(base64.b64encode(raw).decode()) == raw
    assert parse_key(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    for bad in ("short", base64.b64encode(os.urandom(16)).decode(), "!!!notbase64!!!"):
        with pytest.raises(EnvelopeError):
            parse_key(bad)
