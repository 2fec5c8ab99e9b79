"""S3 (and S3-compatible) artifact store: `s3://bucket/prefix`, same contract as the local store.

boto3's standard credential chain and endpoint settings apply (AWS_ACCESS_KEY_ID, AWS_PROFILE, a pod
role; AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for SeaweedFS or MinIO). A PUT is atomic on S3, so a
write is whole or absent; streamed writes spool to a local temp file and upload only on success.
Directories (models) are downloaded into a local cache once and reused while the objects are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, NotFound, StoreError, StoreUnavailable
from .models import _file_lock, cache_dir
from .store import ArtifactStore, file_sha256, local_files

MIB = 1 << 20
SHA_META = "cai-sha256"  # x-amz-meta-cai-sha256: the object's sha256, written with it
DEFAULT_ATTEMPTS = 6  # tries in all; standard mode backs off exponentially (up to 20 s): rides out ~30 s of 5xx/throttling
CONTROL_ATTEMPTS = 3  # lock calls: a lease renews every quarter, so a slow call is retried by the heartbeat instead
MAX_BACKOFF_S = 20.0  # botocore's standard retry mode: sleep up to min(20, 2**n) s before try n + 1


def worst_call_s(client) -> float:
    """The longest one call of `client` can take before it raises: every try timing out on connect and
    read, plus the longest backoff between tries."""
    cfg = client.meta.config
    tries = int((cfg.retries or {}).get("total_max_attempts") or (cfg.retries or {}).get("max_attempts", 4) + 1)
    backoff = sum(min(MAX_BACKOFF_S, 2.0 ** n) for n in range(1, tries))
    return tries * (float(cfg.connect_timeout) + float(cfg.read_timeout)) + backoff
_CREDENTIAL_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"}


def _boto3():
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StoreError("s3:// stores need boto3; run `pip install 'cai-jobs[s3]'`") from None
    return boto3, Config


def make_client(uri: str = "s3://", control: bool = False):
    """An S3 client from the standard chain, with bounded timeouts and retries with backoff on 5xx,
    throttling and dropped connections (AWS_MAX_ATTEMPTS / AWS_RETRY_MODE override the defaults).
    `control`: for small control objects (locks), short timeouts and at most CONTROL_ATTEMPTS tries, so
    one call's worst case (`worst_call_s`) stays well inside a lock's lease."""
    boto3, Config = _boto3()
    from botocore.exceptions import BotoCoreError

    attempts = os.environ.get("AWS_MAX_ATTEMPTS") or str(DEFAULT_ATTEMPTS)
    if not attempts.isdigit() or int(attempts) < 1:
        raise ConfigError(f"AWS_MAX_ATTEMPTS={attempts!r}: expected a whole number >= 1 (tries per S3 request); set it to e.g. 5 or unset it")
    tries, connect, read = (min(int(attempts), CONTROL_ATTEMPTS), 5, 10) if control else (int(attempts), 10, 120)
    config = Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE") or "standard", "total_max_attempts": tries},
        connect_timeout=connect, read_timeout=read, max_pool_connections=16,
    )
    try:
        return boto3.session.Session().client("s3", config=config)
    except BotoCoreError as e:  # e.g. AWS_PROFILE names a profile that does not exist
        raise StoreError(f"{uri}: cannot set up the S3 client: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # botocore: "Invalid endpoint: ..."
        names = [n for n in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(n)]
        where = f"{names[0]}={os.environ[names[0]]!r}" if names else "the S3 endpoint"
        raise ConfigError(f"{uri}: {where} is not a valid endpoint ({str(e).splitlines()[0]}); give a URL such as "
                          "https://s3.us-east-1.amazonaws.com or http://minio:9000") from None


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigError(f"{uri}: no bucket name; use s3://BUCKET/PREFIX")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError(f"{uri}: {bucket!r} is not a valid S3 bucket name; use 3-63 lowercase letters, digits, dots "
                          "and hyphens, starting and ending with a letter or digit")
    prefix = posixpath.normpath(prefix.strip("/")) if prefix.strip("/") else ""
    if prefix == ".." or prefix.startswith("../"):
        raise StoreError(f"{uri}: the prefix climbs out of the bucket; use s3://BUCKET/PREFIX")
    return bucket, prefix


_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError", "Throttling", "ThrottlingException"}


class S3Store(ArtifactStore):
    """Objects under `prefix/` in one bucket; keys map one-to-one to the local store's paths."""

    def __init__(self, uri: str, client=None, multipart_threshold: int = 8 * MIB, cache_root: Path | None = None):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._own_client = client is None
        self._client = client or make_client(self.uri)
        self._checked = False
        self._conditional_ok = False
        self._hashes: dict[str, tuple[str, str]] = {}  # key -> (ETag, sha256) of files this process uploaded
        self.cache_root = Path(cache_root) if cache_root else cache_dir() / "store"
        from boto3.s3.transfer import TransferConfig

        # parts of `multipart_threshold` bytes (S3 wants >= 5 MiB); 4 parts in flight per file
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=max(multipart_threshold, 5 * MIB), max_concurrency=4)

    @property
    def endpoint(self) -> str:
        return self._client.meta.endpoint_url

    @property
    def client(self):
        """The client, after one listing of the bucket: a missing bucket or bad credentials fail here, named.
        (A listing, not HEAD: HEAD errors carry no code, so a bad secret and a denied bucket would look alike.)"""
        if not self._checked:
            with self._errors(""):
                self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            self._checked = True
        return self._client

    def close(self) -> None:
        self._client.close()

    def worst_call_s(self) -> float:
        return worst_call_s(self._client)

    def for_control(self) -> "S3Store":
        """The same bucket and prefix through a client with short timeouts and few tries (locks)."""
        if not self._own_client:  # a client given from outside (tests) is used as it is
            return self
        view = S3Store(self.uri, client=make_client(self.uri, control=True), cache_root=self.cache_root)
        view._conditional_ok = self._conditional_ok
        return view

    # --- errors ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """botocore's exceptions -> one-line StoreErrors that name the bucket/key/endpoint and the fix."""
        from botocore import exceptions as bx

        try:
            yield
        except bx.ClientError as e:
            raise self._client_error(e, key) from None
        except bx.NoCredentialsError:
            raise StoreError(f"{self.uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "AWS_PROFILE, or give the pod an IAM role") from None
        except bx.BotoCoreError as e:
            if isinstance(e, (bx.ConnectionError, bx.HTTPClientError)):  # refused, timed out, cut off: after retries
                raise StoreUnavailable(f"{self.uri}: S3 endpoint {self.endpoint} unreachable ({type(e).__name__}); check "
                                 "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and that the server is up") from None
            raise StoreError(f"{self.uri_for(key)}: S3 error: {str(e).splitlines()[0]}") from None
        except Exception as e:
            if type(e).__module__.startswith(("boto3", "s3transfer")):  # the transfer manager's wrappers
                if isinstance(e.__context__, bx.ClientError):
                    raise self._client_error(e.__context__, key) from None
                raise StoreError(f"{self.uri_for(key)}: S3 transfer failed: {str(e).splitlines()[0]}") from None
            raise

    def _client_error(self, e, key: str) -> StoreError:
        err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        code, status = str(err.get("Code", "")), meta.get("HTTPStatusCode")
        if code == "NoSuchBucket" or (status == 404 and not key):
            return StoreError(f"s3://{self.bucket}: bucket does not exist at {self.endpoint}; create it "
                              f"(`aws s3 mb s3://{self.bucket} --endpoint-url {self.endpoint}`) or fix the store URI")
        if code in ("NoSuchKey", "404") or status == 404:
            return NotFound(f"{self.uri_for(key)}: not found")
        if code in _CREDENTIAL_CODES:
            return StoreError(f"{self.uri}: credentials rejected by {self.endpoint} ({code}); check AWS_ACCESS_KEY_ID / "
                              "AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if status == 403:
            return StoreError(f"{self.uri}: access denied by {self.endpoint} ({code}); check the credentials "
                              "(AWS_ACCESS_KEY_ID, AWS_PROFILE or the pod's role) and the bucket policy")
        message = str(err.get("Message", "")).splitlines()[0] if err.get("Message") else ""
        if (status or 0) >= 500 or status == 429 or code in _TRANSIENT_CODES:  # still failing after botocore's retries
            return StoreUnavailable(f"{self.uri_for(key) if key else self.uri}: S3 {e.operation_name} unavailable ({code or status}: "
                                    f"{message}); retried, still failing: re-run when {self.endpoint} recovers")
        return StoreError(f"{self.uri_for(key) if key else self.uri}: S3 {e.operation_name} failed ({code or status}: {message})")

    # --- keys --------------------------------------------------------------------------------
    def _k(self, key: str) -> str:
        norm = posixpath.normpath(key.strip("/")) if key.strip("/") else ""
        norm = "" if norm == "." else norm
        if norm == ".." or norm.startswith("../"):
            raise StoreError(f"{key}: key escapes the store root {self.uri}")
        return "/".join(p for p in (self.prefix, norm) if p)

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _objects(self, full: str) -> list[dict]:
        """Objects at `full` or under `full/` (not `full-other`), sorted by key."""
        out = []
        with self._errors(self._rel(full)):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out += [o for o in page.get("Contents", []) if not full or o["Key"] == full or o["Key"].startswith(full + "/")]
        return sorted((o for o in out if not o["Key"].endswith("/")), key=lambda o: o["Key"])

    # --- primitives --------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        meta = _sha_metadata(hashlib.sha256(data).hexdigest())
        with self._errors(key):
            if len(data) >= self.transfer.multipart_threshold:
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._k(key), Config=self.transfer, ExtraArgs=meta)
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **meta)

    def create_only(self, key: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *): of two racing writers exactly one gets True."""
        return self._conditional_put(key, data, IfNoneMatch="*")

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        """PUT under `condition` (If-None-Match / If-Match). Refused (412, or 404 for an If-Match whose
        object is gone): ours only if the key now holds our bytes, a landed PUT whose response was lost
        and that botocore retried. 409 (a racing conditional write in flight): ask again."""
        from botocore.exceptions import ClientError

        full, meta = self._k(key), _sha_metadata(hashlib.sha256(data).hexdigest())
        for attempt in range(6):
            with self._errors(key):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=full, Body=data, **condition, **meta)
                    return True
                except ClientError as e:
                    status = _status(e)
                    if status == 412 or (status == 404 and "IfMatch" in condition):
                        return self._holds(key, data)
                    if status != 409:
                        raise
            time.sleep(0.1 * 2**attempt)
        raise StoreError(f"{self.uri_for(key)}: concurrent conditional writes kept conflicting (409); retry the command")

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Read the object and its ETag; if it holds `expected`, PUT `data` with If-Match on that ETag: a
        writer that changed it since makes the PUT fail (412), and the key is not ours."""
        try:
            with self._errors(key):
                obj = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
                current, etag = obj["Body"].read(), obj["ETag"]
        except NotFound:
            return False
        if current == data:
            return True
        if current != expected:
            return False
        return self._conditional_put(key, data, IfMatch=etag)

    def check_conditional_writes(self) -> None:
        """Once per store: a second create-only PUT of one key must be refused (412). An endpoint that
        ignores If-None-Match would let two controllers both win a lock and overwrite manifests."""
        if self._conditional_ok:
            return
        from botocore.exceptions import ClientError

        token = uuid.uuid4().hex
        key = f"_cai/conditional-write-probe-{token}"
        stale_match = True
        try:
            first, second = self.create_only(key, b"first " + token.encode()), self.create_only(key, b"second " + token.encode())
            with self._errors(key):
                try:  # an If-Match on an ETag the object does not have must be refused
                    self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=b"third", IfMatch='"' + "0" * 32 + '"')
                except ClientError as e:
                    if _status(e) != 412:
                        raise
                    stale_match = False
        finally:
            with contextlib.suppress(StoreError):
                self.delete(key)
        if not first or second:
            raise StoreError(f"{self.uri}: the S3 endpoint {self.endpoint} ignores conditional writes (PUT If-None-Match: * "
                             "succeeded twice on one key); cai-jobs needs them for its locks and stage manifests; use AWS S3, "
                             "a recent MinIO or SeaweedFS, or a local store")
        if stale_match:
            raise StoreError(f"{self.uri}: the S3 endpoint {self.endpoint} ignores conditional writes (a PUT If-Match on a "
                             "wrong ETag succeeded); cai-jobs renews and takes over its locks with them; use AWS S3, a recent "
                             "MinIO or SeaweedFS, or a local store")
        self._conditional_ok = True

    def _holds(self, key: str, data: bytes) -> bool:
        try:
            return self.read_bytes(key) == data
        except StoreError:  # deleted since (a lock released): not ours to claim
            return False

    def exists(self, key: str) -> bool:
        """An object, or a directory (objects under `key/`), as the local store counts both."""
        full = self._k(key)
        with self._errors(key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=full)
                return True
            except Exception as e:
                if getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                    raise
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full + "/" if full else "", MaxKeys=1)
            return bool(page.get("KeyCount"))

    def list(self, prefix: str) -> list[str]:
        return [self._rel(o["Key"]) for o in self._objects(self._k(prefix))]

    def children(self, prefix: str) -> list[str]:
        full = self._k(prefix)
        names = []
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{full}/" if full else "", Delimiter="/")
            for page in pages:
                names += [c["Prefix"].rstrip("/").rsplit("/", 1)[-1] for c in page.get("CommonPrefixes", [])]
        return sorted(names)

    def delete(self, key: str) -> None:
        """The object and everything under `key/`, as the local store removes a file or a tree."""
        self._delete_keys([o["Key"] for o in self._objects(self._k(key))])

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            with self._errors(self._rel(keys[i])):
                batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
                failed = self.client.delete_objects(Bucket=self.bucket, Delete=batch).get("Errors", [])
            if failed:
                raise StoreError(f"{self.uri_for(self._rel(failed[0]['Key']))}: delete failed ({failed[0].get('Code')}); retry")

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[io.TextIOBase]:
        """Spooled to a local temp file; uploaded (multipart when big) only if the block finishes."""
        full = self._k(key)
        with tempfile.TemporaryFile(prefix="cai-s3-") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            try:
                yield text
            finally:
                text.detach()  # flushed into `raw`, which closes (and vanishes) with the `with`
            raw.seek(0)  # reached only when the block finished: a failed write uploads nothing
            digest = hashlib.sha256()
            while block := raw.read(1 << 20):
                digest.update(block)
            raw.seek(0)
            with self._errors(key):
                self.client.upload_fileobj(raw, self.bucket, full, Config=self.transfer, ExtraArgs=_sha_metadata(digest.hexdigest()))

    def iter_lines(self, key: str) -> Iterator[str]:
        """Streamed: a 100k-row file never sits in memory. Only b"\\n" ends a line (never inside UTF-8)."""
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
            pending = b""
            with contextlib.closing(body):
                for chunk in body.iter_chunks(1 << 20):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        yield line.decode("utf-8") + "\n"
            if pending:
                yield pending.decode("utf-8")

    def sha256(self, key: str) -> str:
        """One HEAD for objects cai-jobs wrote (their sha256 rides along as object metadata, which any
        overwrite replaces, so it always describes the bytes there), else streamed: never gigabytes
        downloaded again to check a model that is already known."""
        known = self.describe(key)[1]
        if known is not None:
            return known
        digest = hashlib.sha256()
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
            with contextlib.closing(body):
                for chunk in body.iter_chunks(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()

    def describe(self, key: str) -> tuple[int, str | None]:
        """One HEAD: the size, and the sha256 cai-jobs recorded as metadata (or uploaded itself)."""
        full = self._k(key)
        with self._errors(key):
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        if full in self._hashes and head["ETag"] == self._hashes[full][0]:
            return int(head["ContentLength"]), self._hashes[full][1]
        # header case is the server's (MinIO answers Cai-Sha256): look the key up case-insensitively
        recorded = next((v for k, v in (head.get("Metadata") or {}).items() if k.lower() == SHA_META), "")
        ok = len(recorded) == 64 and all(c in "0123456789abcdef" for c in recorded)
        return int(head["ContentLength"]), recorded if ok else None

    def _etag(self, full: str) -> str:
        return self.client.head_object(Bucket=self.bucket, Key=full)["ETag"]

    # --- directories -------------------------------------------------------------------------
    def object_index(self, key: str) -> dict[str, list]:
        """{relative name: [ETag, size]} of the objects under `key/`: one listing, no downloads. Any
        overwrite changes an ETag, so this says whether a tree changed without reading it."""
        full = self._k(key)
        cut = len(full) + 1 if full else 0
        return {o["Key"][cut:]: [o["ETag"], o["Size"]] for o in self._objects(full) if o["Key"] != full}

    def local_dir(self, key: str) -> Path:
        """Downloaded into `<cache>/store/<bucket>/<prefix>/<key>`: into a temp dir, renamed into place,
        with a marker of the objects' ETags and sizes; reused while the bucket holds the same objects."""
        full = self._k(key)
        index = self.object_index(key)
        if not index:
            raise StoreError(f"{self.uri_for(key)}: directory not found")
        dest = self.cache_root / self.bucket / full
        marker = dest.parent / f".{dest.name}.sync.json"
        if _synced(dest, marker, index):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(dest.parent / f".{dest.name}.lock"):  # parallel shards download once
            if _synced(dest, marker, index):
                return dest
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
            try:
                for rel, (_, size) in index.items():
                    target = (tmp / rel).resolve()
                    if tmp.resolve() not in target.parents:
                        raise StoreError(f"{self.uri_for(key)}/{rel}: object name escapes the directory")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with self._errors(f"{key}/{rel}"):
                        self.client.download_file(self.bucket, f"{full}/{rel}", str(target), Config=self.transfer)
                    if target.stat().st_size != size:
                        raise StoreError(f"{self.uri_for(key)}/{rel}: changed while downloading; retry")
                marker.unlink(missing_ok=True)
                if dest.exists():
                    old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old.", suffix=".tmp"))
                    os.replace(dest, old / dest.name)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(tmp, dest)
                part = marker.with_name(marker.name + ".tmp")
                part.write_text(json.dumps(index, sort_keys=True))
                os.replace(part, marker)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return dest

    def put_dir(self, src: Path, key: str, link: bool = False) -> None:
        """Upload every file (multipart when big), then drop objects the new tree no longer has.
        Readers trust the tree only once the stage manifest, written after this, exists."""
        src, full = Path(src), self._k(key)
        if not src.is_dir():
            raise StoreError(f"{src}: not a directory; cannot upload it to {self.uri_for(key)}")
        uploaded = set()
        for rel, path in local_files(src):
            sha = file_sha256(path)
            with self._errors(f"{key}/{rel}"):
                self.client.upload_file(str(path), self.bucket, f"{full}/{rel}", Config=self.transfer, ExtraArgs=_sha_metadata(sha))
                self._hashes[f"{full}/{rel}"] = (self._etag(f"{full}/{rel}"), sha)
            uploaded.add(f"{full}/{rel}")
        self._delete_keys([o["Key"] for o in self._objects(full) if o["Key"] not in uploaded])


def _status(e) -> int | None:
    """The HTTP status of a botocore ClientError."""
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _sha_metadata(sha: str) -> dict:
    return {"Metadata": {SHA_META: sha}}


def _synced(dest: Path, marker: Path, index: dict) -> bool:
    try:
        return dest.is_dir() and json.loads(marker.read_text()) == index
    except (OSError, ValueError):
        return False
