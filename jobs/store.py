"""Artifact stores: one interface over a local directory and S3 (store_s3.py), atomic writes, manifests last.

Keys are POSIX-style relative paths (`runs/<id>/round-1/generate/sft.jsonl`). A write either
lands whole or not at all, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import NotFound, StoreError

MANIFEST = "stage.json"
CHEAP_HASH_BYTES = 16 << 20  # local files up to this size are re-hashed by completeness checks; larger ones by size


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # mkstemp creates 0600; artifacts get normal file modes
_DIR_MODE = 0o777 & ~_current_umask()  # and mkdtemp 0700: copied trees get normal directory modes


def _temp_file(path: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry (a link, a rename) durable: without it a power loss can undo it."""
    with contextlib.suppress(OSError):  # some filesystems cannot open or sync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_temp(name: str) -> bool:
    """Our temp files and dirs are `.<name>.<random>.tmp`: in-flight writes, never artifacts."""
    return name.startswith(".") and name.endswith(".tmp")


def tree_digest(files: Iterable[tuple[str, str]]) -> str:
    """A directory's content identity: sha256 over each file's relative path and sha256, in path
    order. The same tree gives the same digest in a local directory, the local store or S3."""
    lines = "".join(f"{rel}\t{sha}\n" for rel, sha in sorted(files))
    return "tree:" + hashlib.sha256(lines.encode("utf-8")).hexdigest()


_SHA_MEMO: dict[tuple, str] = {}  # (device, inode, size, mtime, ctime) -> sha256: a file is hashed once per process


def file_sha256(path: Path) -> str:
    """Streamed in blocks (a model's shard never sits in memory); remembered while the file is unchanged."""
    st = os.stat(path)
    memo = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # by inode: a hard link is hashed once
    if memo not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        _SHA_MEMO[memo] = digest.hexdigest()
    return _SHA_MEMO[memo]


def local_files(root: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every file under `root`, symlinks followed (a Hub snapshot links
    into its blobs; a linked subdirectory counts), in-flight temp files and dangling links left out.
    Digests, copies and uploads all walk this one list, so they cannot disagree."""
    root = Path(root)
    out = []
    for top, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not _is_temp(d)]
        for name in names:
            path = Path(top) / name
            if not _is_temp(name) and path.is_file():
                out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def local_tree_digest(root: Path) -> str:
    return tree_digest((rel, file_sha256(p)) for rel, p in local_files(root))


class ArtifactStore(ABC):
    """What stages and the controller need from storage, nothing more."""

    uri: str

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic: readers see the old object or the whole new one."""

    @abstractmethod
    def create_only(self, key: str, data: bytes) -> bool:
        """Write only if `key` does not exist; False if it already did (manifests, locks).

        Idempotent: an object that already holds exactly `data` is our own write (a retry after a
        response was lost), so True. Callers put a writer token in `data` (locks, manifests and
        promotion entries all do) so that another writer's object never matches byte for byte.
        """

    @abstractmethod
    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Compare-and-swap by content: replace `key` with `data` only if it holds exactly `expected` now;
        False if it holds anything else, or nothing. Idempotent as create_only is: an object that already
        holds `data` is our own write that landed (lock renewals and takeovers)."""

    def check_conditional_writes(self) -> None:
        """Raise StoreError if create-only writes are not enforced (a local directory always is: link(2))."""

    def worst_call_s(self) -> float:
        """The longest one call may take before it fails (a lock's lease is sized from it)."""
        return 5.0  # a local filesystem call; an NFS stall longer than this is beyond a lease anyway

    def for_control(self) -> "ArtifactStore":
        """A view of this store for small control objects (locks): short timeouts, few retries."""
        return self

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix`, sorted."""

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """Names of the "directories" right under `prefix`, sorted: one listing call, not a walk of
        every object below (a run holds model weights). Some S3 servers (SeaweedFS) still list a
        "directory" whose objects were all deleted: callers check for the object they need."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[io.TextIOBase]:
        """Stream text into `key`; committed on normal exit, discarded on exception."""

    @abstractmethod
    def local_dir(self, key: str) -> Path:
        """A local directory holding the artifact tree under `key` (downloaded if remote)."""

    @abstractmethod
    def put_dir(self, src: Path, key: str, link: bool = False) -> None:
        """Upload a local directory tree under `key` (every file `local_files` lists, so the copy has the
        source's tree digest). `link`: the source is never edited in place (a Hub cache, a download
        cache), so a local store may hard-link it instead of copying."""

    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    # --- conveniences built on the primitives -------------------------------------------------
    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        try:
            return json.loads(self.read_bytes(key))
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.uri_for(key)}: invalid JSON ({e.msg}); delete it to recompute") from None

    def write_json(self, key: str, obj: Any) -> None:
        self.write_text(key, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def iter_lines(self, key: str) -> Iterator[str]:
        """Text lines with their newline; stores that can stream override this (100k-row files)."""
        # only "\n" ends a line: JSON text may hold U+2028 or "\r", which str.splitlines would split on
        yield from io.StringIO(self.read_text(key), newline="\n")

    def iter_jsonl(self, key: str) -> Iterator[dict]:
        for n, line in enumerate(self.iter_lines(key), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise StoreError(f"{self.uri_for(key)}: line {n}: invalid JSON ({e.msg})") from None

    def write_jsonl(self, key: str, rows: Iterable[dict]) -> int:
        n = 0
        with self.open_writer(key) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        return n

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self.read_bytes(key)).hexdigest()

    def describe(self, key: str) -> tuple[int, str | None]:
        """(size, sha256 where it is cheap to know, else None) of the object at `key`; NotFound if absent.
        Completeness checks compare these with what a stage's manifest recorded."""
        data = self.read_bytes(key)
        return len(data), hashlib.sha256(data).hexdigest()

    def digest(self, key: str) -> str | None:
        """Content identity of what is at `key`: a file's sha256, a directory's tree digest (a model),
        or None when nothing is there. Stage identities are made of these."""
        keys = self.list(key)
        key = key.strip("/")
        if not keys:
            return None
        if keys == [key]:
            return self.sha256(key)
        return tree_digest((k[len(key) + 1:], self.sha256(k)) for k in keys)


class LocalStore(ArtifactStore):
    """A directory on disk; atomicity by temp file + os.replace in the same directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        key = key.strip("/")
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"{key}: key escapes the store root {self.root}")
        return path

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.uri_for(key)}: not found") from None

    def sha256(self, key: str) -> str:
        try:
            return file_sha256(self._path(key))
        except FileNotFoundError:
            raise StoreError(f"{self.uri_for(key)}: not found") from None

    def iter_lines(self, key: str) -> Iterator[str]:
        try:
            fh = open(self._path(key), encoding="utf-8", newline="\n")
        except FileNotFoundError:
            raise StoreError(f"{self.uri_for(key)}: not found") from None
        with fh:
            yield from fh

    @contextlib.contextmanager
    def _atomic(self, key: str, mode: str) -> Iterator[io.IOBase]:
        """A temp file beside the target, renamed over it only if the block finishes."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_file(path)
        try:
            with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._atomic(key, "wb") as f:
            f.write(data)

    def create_only(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_file(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a power loss must not leave an empty lock or manifest behind the link
        try:
            os.link(tmp, path)  # link fails if the target exists: create-only, and the content is whole
            _fsync_dir(path.parent)
            return True
        except FileExistsError:
            with contextlib.suppress(OSError):
                return path.read_bytes() == data
            return False
        finally:
            os.unlink(tmp)

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Under an exclusive flock of the key's directory (every writer of a local store is on this
        host), compare, then replace atomically."""
        import fcntl

        path = self._path(key)
        if not path.parent.is_dir():
            return False
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return False
            if current == data:
                return True
            if current != expected:
                return False
            with self._atomic(key, "wb") as f:
                f.write(data)
            return True
        finally:
            os.close(fd)  # releases the flock

    def describe(self, key: str) -> tuple[int, str | None]:
        """The size from stat; the sha256 only up to CHEAP_HASH_BYTES (a model's weights are checked by size)."""
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"{self.uri_for(key)}: not found") from None
        return size, (file_sha256(path) if size <= CHEAP_HASH_BYTES else None)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix.strip("/")]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not any(_is_temp(part) for part in p.relative_to(self.root).parts)
        )

    def children(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not _is_temp(p.name)) if base.is_dir() else []

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[io.TextIOBase]:
        with self._atomic(key, "w") as f:
            yield f

    def local_dir(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_dir():
            raise StoreError(f"{self.uri_for(key)}: directory not found")
        return path

    def put_dir(self, src: Path, key: str, link: bool = False) -> None:
        """Copy into a temp dir, then rename into place, so a half-copied model never shows. A user's own
        directory is copied, never linked: save_pretrained rewrites files in place, which would change
        every earlier run's copy with it."""
        dest = self._path(key)
        if Path(src).resolve() == dest:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
        try:
            for rel, path in local_files(Path(src)):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (_link_or_copy if link else shutil.copy2)(str(path), str(tmp / rel))
            for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                d.chmod(_DIR_MODE)  # mkdtemp's 0700 must not outlive the rename
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows it (a 15 GB model imported in no time), else a copy.
    Safe because artifacts are only ever replaced whole (rename), never edited in place."""
    try:
        os.link(os.path.realpath(src), dst)  # a Hub snapshot is symlinks into its blobs: link the blob
    except OSError:
        shutil.copy2(src, dst)


def open_store(uri: str | Path) -> ArtifactStore:
    """`s3://bucket/prefix` or a local directory (plain path or file:// URI)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        from .store_s3 import S3Store  # boto3 is the `s3` extra: imported only for S3 stores

        return S3Store(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return LocalStore(uri)


def split_uri(uri: str) -> tuple[ArtifactStore, str]:
    """Split `<store>/<key>` where key starts at `runs/`: the spec URI a pod receives."""
    marker = "/runs/"
    idx = uri.rfind(marker)  # the store's own path may contain /runs/; the key's is the last one
    if idx < 0:
        raise StoreError(f"{uri}: expected a URI of the form <store>/runs/<run-id>/...; pass the spec URI cai printed")
    return open_store(uri[:idx] or "/"), uri[idx + 1:]
