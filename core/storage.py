"""Object storage behind one small interface: ``file://`` directories and ``s3://`` buckets.

Archives, GDPR exports and backups all stream through ``Storage.writer``: bytes are hashed
(sha256) on the way out and an object becomes visible only when its writer closes cleanly, so a
crash or an exception mid-upload never leaves a half object under the final key. Vendor errors
are translated here: a missing object is ``FileNotFoundError`` on every backend, everything else
that stops storage (unreachable endpoint, missing bucket, denied) is ``StorageError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from core.envelope import MAGIC, DecryptingReader, Encryptor, Keyring
from core.settings import Settings, get_settings, redact_url

PART_SIZE = 8 * 1024 * 1024  # S3 multipart part size; parts are at least 5 MiB except the last
_TMP_MARK = ".tmp-"


class StorageError(Exception):
    """Storage cannot be used: unreachable, missing bucket, access denied, bad URL."""


class PutResult(NamedTuple):
    key: str
    size: int
    sha256: str


class ObjectInfo(NamedTuple):
    key: str
    size: int
    modified: datetime | None


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad object key {key!r}: use a relative a/b/c path")
    if any(p.startswith(".") and _TMP_MARK in p for p in parts):
        raise ValueError(f"bad object key {key!r}: reserved name")
    return key


class ObjectWriter(Protocol):
    result: PutResult | None

    def write(self, data: bytes) -> int: ...


class Storage(Protocol):
    url: str
    keyring: Keyring | None  # set: objects are envelope-encrypted (core.envelope)

    # exclusive=True: publish only if no object has the key yet, atomically (no check-then-put
    # window); otherwise FileExistsError when the writer closes, and the existing object stays.
    def writer(
        self, key: str, *, storage_class: str | None = None, exclusive: bool = False
    ) -> contextlib.AbstractContextManager[ObjectWriter]: ...
    def open(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def set_storage_class(self, key: str, storage_class: str) -> None: ...
    def sweep_incomplete(self, older_than: timedelta) -> int: ...

    # Conveniences built on the five primitives above (see _Conveniences).
    def put_bytes(
        self, key: str, data: bytes, *, storage_class: str | None = None
    ) -> PutResult: ...
    def get_bytes(self, key: str) -> bytes: ...
    def sha256(self, key: str) -> str: ...
    def exists(self, key: str) -> bool: ...


class _Hashing:
    """Counts and hashes what passes through; subclasses say where the bytes go."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.size = 0
        self._hash = hashlib.sha256()
        self.result: PutResult | None = None

    def write(self, data: bytes) -> int:
        if data:
            self._hash.update(data)
            self.size += len(data)
            self._sink(data)
        return len(data)

    def _sink(self, data: bytes) -> None:
        raise NotImplementedError

    def _finish(self) -> PutResult:
        self.result = PutResult(self.key, self.size, self._hash.hexdigest())
        return self.result


class _SealingWriter:
    """Encrypts on the way into a backend writer; the result (size, sha256) is the stored
    ciphertext's, so a verify hashes what is stored without decrypting it."""

    def __init__(self, raw: ObjectWriter, encryptor: Encryptor) -> None:
        self._raw = raw
        self._enc = encryptor
        self.result: PutResult | None = None

    def write(self, data: bytes) -> int:
        if data:
            sealed = self._enc.update(bytes(data))
            if sealed:
                self._raw.write(sealed)
        return len(data)

    def close(self) -> None:
        self._raw.write(self._enc.finish())

    def published(self) -> None:
        self.result = self._raw.result


class _Prefixed:
    """A read() stream with a few already-read bytes put back in front."""

    def __init__(self, head: bytes, raw: IO[bytes]) -> None:
        self._head = head
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size is None or size < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._raw.read(size)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _Conveniences:
    # Client-side envelope encryption (TIDEMILL_ENCRYPTION_KEY): when set, objects are sealed
    # on write; reads decrypt whatever is sealed and pass older plaintext objects through.
    keyring: Keyring | None = None

    def _raw_writer(
        self, key: str, *, storage_class: str | None = None, exclusive: bool = False
    ) -> contextlib.AbstractContextManager[ObjectWriter]:
        raise NotImplementedError

    def _raw_open(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        raise NotImplementedError

    @contextlib.contextmanager
    def writer(
        self, key: str, *, storage_class: str | None = None, exclusive: bool = False
    ) -> Iterator[ObjectWriter]:
        with self._raw_writer(key, storage_class=storage_class, exclusive=exclusive) as raw:
            if self.keyring is None:
                yield raw
                return
            sealed = _SealingWriter(raw, Encryptor(self.keyring))
            yield sealed
            sealed.close()
        sealed.published()  # the backend has committed: its size and sha256 are final

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        """The object's plaintext; an encrypted one is authenticated chunk by chunk as it is
        read (EnvelopeError on a wrong key or damaged bytes)."""
        with self._raw_open(key) as raw:
            head = raw.read(len(MAGIC))
            while len(head) < len(MAGIC) and (more := raw.read(len(MAGIC) - len(head))):
                head += more
            stream = _Prefixed(head, raw)
            if head == MAGIC:
                yield DecryptingReader(stream, self.keyring, name=key)  # type: ignore[misc]
            else:
                yield stream  # type: ignore[misc]

    def stat(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes, *, storage_class: str | None = None) -> PutResult:
        with self.writer(key, storage_class=storage_class) as w:
            w.write(data)
        assert w.result is not None
        return w.result

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def sha256(self, key: str) -> str:
        """Of the stored bytes (ciphertext when encrypted): what manifests record."""
        digest = hashlib.sha256()
        with self._raw_open(key) as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
        return digest.hexdigest()

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except FileNotFoundError:
            return False
        return True


# ---------------------------------------------------------------------------------------- file


class _FileWriter(_Hashing):
    def __init__(self, key: str, fh: IO[bytes]) -> None:
        super().__init__(key)
        self._fh = fh

    def _sink(self, data: bytes) -> None:
        self._fh.write(data)


class FileStorage(_Conveniences):
    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def _raw_writer(
        self, key: str, *, storage_class: str | None = None, exclusive: bool = False
    ) -> Iterator[_FileWriter]:
        # storage_class has no meaning on a file system; accepted so callers need not care.
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write under {self.root}: {exc}") from exc
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARK}", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                writer = _FileWriter(key, fh)
                yield writer
                fh.flush()
                os.fsync(fh.fileno())
            if exclusive:
                # link() fails with EEXIST if the name exists: no window between a check and
                # the publish (two archivers racing on one name, one wins, the other is told)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise FileExistsError(f"{self.url}: {key} already exists") from None
                except OSError as exc:
                    raise StorageError(f"cannot publish {key} under {self.root}: {exc}") from exc
                os.unlink(tmp)
            else:
                os.replace(tmp, path)  # atomic: readers see the old object or the whole new one
            _fsync_dir(path.parent)
            writer._finish()
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _raw_open(self, key: str) -> Iterator[IO[bytes]]:
        with open(self._path(key), "rb") as fh:
            yield fh

    def stat(self, key: str) -> ObjectInfo:
        st = self._path(key).stat()
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.exists():
            return
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            for name in files:
                if name.startswith(".") and _TMP_MARK in name:
                    continue  # an upload in progress or abandoned by a crash
                key = (rel / name).as_posix() if rel.parts else name
                if key.startswith(prefix):
                    keys.append(key)
        for key in sorted(keys):
            try:
                yield self.stat(key)
            except FileNotFoundError:  # deleted while listing
                continue

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def set_storage_class(self, key: str, storage_class: str) -> None:
        """A file system has one class; only checks that the object exists."""
        self.stat(key)

    def sweep_incomplete(self, older_than: timedelta) -> int:
        """Remove uploads abandoned by a crash (``.NAME.tmp-*`` files, invisible to ``list``)
        not written to for ``older_than``; returns how many. A live upload keeps its temp file's
        mtime fresh, so a generous ``older_than`` (a day) never touches one."""
        if not self.root.exists():
            return 0
        cut = datetime.now(UTC).timestamp() - older_than.total_seconds()
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not (name.startswith(".") and _TMP_MARK in name):
                    continue
                path = Path(dirpath) / name
                try:
                    if path.stat().st_mtime < cut:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:  # finished or removed meanwhile
                    continue
        return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ s3


class _S3Writer(_Hashing):
    """Buffers one part at a time; small objects go up in one PUT, large ones as multipart."""

    def __init__(
        self, store: S3Storage, key: str, storage_class: str | None, *, exclusive: bool = False
    ) -> None:
        super().__init__(key)
        self._store = store
        self._full_key = store._full_key(key)
        self._extra: dict[str, Any] = {"StorageClass": storage_class} if storage_class else {}
        self._extra.update(store.sse)
        # a conditional write (S3 since 2024-08): refused with 412 if the key exists
        self._condition: dict[str, Any] = {"IfNoneMatch": "*"} if exclusive else {}
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def _sink(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= PART_SIZE:
            self._upload_part(bytes(self._buffer[:PART_SIZE]))
            del self._buffer[:PART_SIZE]

    def _upload_part(self, body: bytes) -> None:
        s3, bucket = self._store._client, self._store.bucket
        with self._store._translate(self.key):
            if self._upload_id is None:
                created = s3.create_multipart_upload(
                    Bucket=bucket, Key=self._full_key, **self._extra
                )
                self._upload_id = created["UploadId"]
            number = len(self._parts) + 1
            answer = s3.upload_part(
                Bucket=bucket,
                Key=self._full_key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def commit(self) -> None:
        s3, bucket = self._store._client, self._store.bucket
        if self._upload_id is None:
            with self._exists_guard(), self._store._translate(self.key):
                s3.put_object(
                    Bucket=bucket,
                    Key=self._full_key,
                    Body=bytes(self._buffer),
                    **self._extra,
                    **self._condition,
                )
        else:
            if self._buffer:
                self._upload_part(bytes(self._buffer))
            with self._exists_guard(), self._store._translate(self.key):
                s3.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self._full_key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                    **self._condition,
                )
        self._buffer.clear()
        self._finish()

    @contextlib.contextmanager
    def _exists_guard(self) -> Iterator[None]:
        """An exclusive write refused because the key exists -> FileExistsError."""
        try:
            yield
        except StorageError as exc:
            cause = exc.__cause__
            response = getattr(cause, "response", None) or {}
            code = str(response.get("Error", {}).get("Code", ""))
            if self._condition and code in ("PreconditionFailed", "412"):
                raise FileExistsError(f"{self._store.url}: {self.key} already exists") from exc
            raise

    def abort(self) -> None:
        if self._upload_id is None:
            return
        # Best effort: an unreachable S3 cannot be told either; a bucket lifecycle rule for
        # incomplete multipart uploads is the backstop.
        with contextlib.suppress(Exception):
            self._store._client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._full_key, UploadId=self._upload_id
            )


class S3Storage(_Conveniences):
    def __init__(
        self,
        url: str,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.url = url
        # S3 server-side encryption on every write (and on storage-class copies)
        self.sse: dict[str, str] = {}
        if sse:
            if sse not in ("AES256", "aws:kms"):
                raise StorageError(f"TIDEMILL_S3_SSE={sse!r}: use AES256 or aws:kms")
            self.sse["ServerSideEncryption"] = sse
            if sse == "aws:kms" and sse_kms_key_id:
                self.sse["SSEKMSKeyId"] = sse_kms_key_id
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def _full_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _short_key(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    @contextlib.contextmanager
    def _translate(self, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.url}: no object {key}") from exc
            raise StorageError(
                f"{redact_url(self.url)}: {code or 'error'} on {key}: {exc}"
            ) from exc
        except BotoCoreError as exc:
            where = self.endpoint_url or "AWS"
            raise StorageError(f"{redact_url(self.url)} ({where}) unreachable: {exc}") from exc

    @contextlib.contextmanager
    def _raw_writer(
        self, key: str, *, storage_class: str | None = None, exclusive: bool = False
    ) -> Iterator[_S3Writer]:
        writer = _S3Writer(self, key, storage_class, exclusive=exclusive)
        try:
            yield writer
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    @contextlib.contextmanager
    def _raw_open(self, key: str) -> Iterator[IO[bytes]]:
        with self._translate(key):
            answer = self._client.get_object(Bucket=self.bucket, Key=self._full_key(key))
        body = answer["Body"]
        try:
            yield body
        finally:
            body.close()

    def stat(self, key: str) -> ObjectInfo:
        with self._translate(key):
            head = self._client.head_object(Bucket=self.bucket, Key=self._full_key(key))
        return ObjectInfo(key, int(head["ContentLength"]), head.get("LastModified"))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self._client.get_paginator("list_objects_v2")
        with self._translate(prefix or "/"):
            pages = list(paginator.paginate(Bucket=self.bucket, Prefix=full_prefix))
        for page in pages:  # S3 lists keys in UTF-8 binary order, i.e. sorted
            for obj in page.get("Contents", []):
                yield ObjectInfo(
                    self._short_key(obj["Key"]), int(obj["Size"]), obj.get("LastModified")
                )

    def delete(self, key: str) -> None:
        with self._translate(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._full_key(key))

    def set_storage_class(self, key: str, storage_class: str) -> None:
        """Server-side copy of the object onto itself in the new class (multipart when large).

        Objects are written in the default class, verified, then moved: a GLACIER object cannot
        be read back to check its checksum.
        """
        full_key = self._full_key(key)
        with self._translate(key):
            self._client.copy(
                {"Bucket": self.bucket, "Key": full_key},
                self.bucket,
                full_key,
                ExtraArgs={
                    "StorageClass": storage_class,
                    "MetadataDirective": "COPY",
                    **self.sse,
                },
            )

    def sweep_incomplete(self, older_than: timedelta) -> int:
        """Abort multipart uploads under our prefix started more than ``older_than`` ago (a
        crashed writer never completed or aborted them; their parts are billed). A bucket
        lifecycle rule (AbortIncompleteMultipartUpload) is the backstop. Returns how many."""
        cut = datetime.now(UTC) - older_than
        full_prefix = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_multipart_uploads")
        with self._translate(full_prefix or "/"):
            pages = list(paginator.paginate(Bucket=self.bucket, Prefix=full_prefix))
        aborted = 0
        for page in pages:
            for upload in page.get("Uploads", []):
                initiated = upload.get("Initiated")
                if initiated is None or initiated >= cut:
                    continue
                with self._translate(self._short_key(upload["Key"])):
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                aborted += 1
        return aborted


# ------------------------------------------------------------------------------------- factory


def open_storage(url: str | None = None, *, settings: Settings | None = None) -> Storage:
    """The storage named by ``url`` (default: STORAGE_URL)."""
    settings = settings or get_settings()
    url = url or settings.storage_url
    parts = urlsplit(url)
    store: FileStorage | S3Storage
    if parts.scheme == "file":
        path = Path((parts.netloc + parts.path) or ".").expanduser()
        store = FileStorage(url, path.resolve())
    elif parts.scheme == "s3":
        if not parts.netloc:
            raise StorageError(f"{url}: an s3:// URL needs a bucket (s3://BUCKET/PREFIX)")
        store = S3Storage(
            url,
            parts.netloc,
            parts.path,
            endpoint_url=settings.s3_endpoint_url,
            sse=getattr(settings, "s3_sse", None),
            sse_kms_key_id=getattr(settings, "s3_sse_kms_key_id", None),
        )
    else:
        raise StorageError(f"{url}: storage URLs are file://PATH or s3://BUCKET/PREFIX")
    store.keyring = keyring_from_settings(settings)
    return store


def keyring_from_settings(settings: Settings) -> Keyring | None:
    """The master keys from TIDEMILL_ENCRYPTION_KEY (+ _OLD_KEYS); None: no encryption."""
    from core.envelope import EnvelopeError

    current = getattr(settings, "encryption_key", None)
    if not current:
        return None
    try:
        return Keyring.from_text(current, getattr(settings, "encryption_old_keys", None))
    except EnvelopeError as exc:
        raise StorageError(f"TIDEMILL_ENCRYPTION_KEY: {exc}") from None
