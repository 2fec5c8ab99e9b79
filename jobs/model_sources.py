"""Model references -> an immutable identity, and a copy of the model every stage can read.

A run's models (`model`, `judge.model`, `evaluate.judge_model`) may be named five ways: `bundled:NAME`
(shipped in a package the images carry), a local Hugging Face directory, `store:KEY`, `s3://bucket/prefix/`
or a Hub id (`hf:org/name@revision`, or plain `org/name`). Before planning, the controller resolves each
to what it is by content (a Hub commit sha, a directory's tree digest) and imports what a stage pod could
not reach into the run's store (`runs/<id>/inputs/models/<role>/`), so pods need nothing but the store.
Stages then read every model as `bundled:` or `store:`, and a changed model at the same address changes
every stage's identity that read it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from .errors import CaiError, ModelError
from .store import ArtifactStore, local_files, local_tree_digest, tree_digest

SCHEMES = {"bundled:": "bundled", "store:": "store", "s3://": "s3", "hf:": "hub"}  # anything else: a local path or `org/name`
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")  # what transformers loads from a model directory


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # as configured
    kind: str  # bundled | store | local | s3 | hub
    stage_ref: str  # what stage specs carry: `bundled:NAME` or `store:KEY`
    digest: str  # content identity: `sha256:` of a bundled file, `tree:` of a directory
    commit: str | None = None  # Hub models: the commit sha the revision resolved to

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def model_kind(ref: str) -> str:
    from .hub import looks_like_hub_id

    for prefix, kind in SCHEMES.items():
        if ref.startswith(prefix):
            return kind
    return "hub" if looks_like_hub_id(ref) else "local"  # a plain `org/name`, else a path (existing or not)


def planned_ref(ref: str, import_key: str) -> str:
    """What stages will read for `ref`, known without touching anything (so `cai render` can plan)."""
    return ref if model_kind(ref) in ("bundled", "store") else f"store:{import_key}"


def check_model_files(names: Iterable[str], where: str) -> None:
    """A model directory has a config.json and weights at its top, or it is not one (one line, before any
    download). `names` are relative to the directory: a checkpoint one level down does not count."""
    names = [n for n in names if "/" not in n]
    if "config.json" not in names:
        raise ModelError(f"{where}: no config.json; point at a Hugging Face model directory (save_pretrained output)")
    if not any(n.endswith(WEIGHTS) for n in names):
        raise ModelError(f"{where}: no weights (*.safetensors or pytorch_model*.bin) beside config.json; upload the whole model directory")


def log(msg: str) -> None:
    print(f"[cai] {msg}", file=sys.stderr, flush=True)


def _import(store: ArtifactStore, src: Path, key: str, digest: str, where: str, link: bool = True) -> None:
    """Copy a model directory into the store unless the same content is already there, then check it.
    `link`: the source is a cache that is never edited in place (a Hub snapshot, a download cache)."""
    if store.digest(key) == digest:
        return
    log(f"{where}: importing into {store.uri_for(key)}")
    try:
        store.put_dir(src, key, link=link)
    except OSError as e:
        raise ModelError(f"{where}: cannot copy {src} into {store.uri_for(key)} ({e}); check the directory and free space") from None
    if store.digest(key) != digest:
        raise ModelError(f"{where}: the copy at {store.uri_for(key)} differs from its source (changed while copying?); re-run")


def bundled_digest(ref: str) -> str:
    """A bundled model's identity is its file's pinned sha256 (the stage that converts it checks the file
    against it), so the controller, `cai render` and the stage agree without the package installed."""
    from .models import bundled_entry

    return "sha256:" + bundled_entry(ref.split(":", 1)[1])[2]


def _bundled(ref: str) -> ResolvedModel:
    return ResolvedModel(ref, "bundled", ref, bundled_digest(ref))


def _from_store(ref: str, store: ArtifactStore, where: str) -> ResolvedModel:
    key = ref.split(":", 1)[1].strip("/")
    names = [n[len(key) + 1:] for n in store.list(key) if n.startswith(key + "/")]
    if not names:
        raise ModelError(f"{where}: {store.uri_for(key)}: no model there; give a store key that holds a model directory")
    check_model_files(names, f"{where}: {ref}")
    return ResolvedModel(ref, "store", ref, store.digest(key) or "")


def precheck(ref: str, where: str) -> None:
    """What can be checked without a store or a network (a local directory, a bundled name): called
    before a run writes anything, so a typo costs one line and no half-started run."""
    kind = model_kind(ref)
    if kind == "bundled":
        try:
            bundled_digest(ref)
        except ModelError as e:
            raise ModelError(f"{where}: {e}") from None
    elif kind == "local":
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ModelError(f"{where}: {ref}: {'not a directory' if path.exists() else 'no such directory'}; give a Hugging Face model "
                             "directory, bundled:NAME, store:KEY, s3://BUCKET/PREFIX/ or hf:ORG/NAME")
        check_model_files([rel for rel, _ in local_files(path)], f"{where}: {ref}")
    elif kind == "hub":
        from .hub import parse_hub_ref

        parse_hub_ref(ref, where=where)


def _local(ref: str, store: ArtifactStore, key: str, where: str) -> ResolvedModel:
    precheck(ref, where)
    path = Path(ref).expanduser()
    digest = local_tree_digest(path)
    _import(store, path, key, digest, where, link=False)
    return ResolvedModel(ref, "local", f"store:{key}", digest)


def _s3(ref: str, store: ArtifactStore, key: str, where: str) -> ResolvedModel:
    """Listed first (a prefix without a model fails before any download), then fetched into the local
    cache, which is reused while the objects' ETags are unchanged, and imported."""
    from .store_s3 import S3Store

    src = S3Store(ref)
    try:
        names = src.list("")
        if not names:
            raise ModelError(f"{where}: {ref}: no objects under this prefix; upload the model directory there or fix the URI")
        check_model_files(names, f"{where}: {ref}")
        path = src.local_dir("")
    finally:
        src.close()
    digest = local_tree_digest(path)
    _import(store, path, key, digest, where)
    return ResolvedModel(ref, "s3", f"store:{key}", digest)


def _hub(ref: str, store: ArtifactStore, key: str, where: str, previous: dict | None) -> ResolvedModel:
    """The revision's commit first; when an earlier attempt imported that very commit and the store still
    holds its bytes, nothing is downloaded again."""
    from .hub import parse_hub_ref, snapshot

    repo, revision = parse_hub_ref(ref, where=where)
    previous = previous or {}

    def imported(commit: str) -> bool:
        return previous.get("commit") == commit and previous.get("stage_ref") == f"store:{key}" and store.digest(key) == previous.get("digest")

    snap = snapshot(repo, revision, repo_type="model", error=ModelError, where=where, known=imported)
    if snap.path is None:
        return ResolvedModel(ref, "hub", f"store:{key}", previous["digest"], commit=snap.commit)
    check_model_files([rel for rel, _ in local_files(snap.path)], f"{where}: {ref}@{snap.commit[:12]}")
    digest = local_tree_digest(snap.path)
    _import(store, snap.path, key, digest, where)
    return ResolvedModel(ref, "hub", f"store:{key}", digest, commit=snap.commit)


def identity_of(ref: str, store: ArtifactStore, where: str) -> str:
    """What a model is, cheaply and without importing it (realignment decides "nothing changed" before a
    run exists): a Hub id is its commit (asked for, not downloaded), S3 objects their ETags and sizes."""
    kind = model_kind(ref)
    try:
        if kind == "bundled":
            return bundled_digest(ref)
        if kind == "store":
            return _from_store(ref, store, where).digest
        if kind == "local":
            precheck(ref, where)
            return local_tree_digest(Path(ref).expanduser())
        if kind == "s3":
            from .store_s3 import S3Store

            src = S3Store(ref)
            try:
                index = src.object_index("")
            finally:
                src.close()
            if not index:
                raise ModelError(f"{where}: {ref}: no objects under this prefix; upload the model directory there or fix the URI")
            return "s3-etags:" + tree_digest((rel, f"{etag}:{size}") for rel, (etag, size) in index.items()).split(":", 1)[1]
        from .hub import parse_hub_ref, snapshot

        repo, revision = parse_hub_ref(ref, where=where)
        return f"hf:{repo}@{snapshot(repo, revision, error=ModelError, where=where, known=lambda commit: True).commit}"
    except ModelError:
        raise
    except CaiError as e:
        raise ModelError(f"{where}: {ref}: {e}") from None


def resolve_source(ref: str, store: ArtifactStore, import_key: str, where: str, previous: dict | None = None) -> ResolvedModel:
    """Resolve one reference; `where` names the config field in errors (`model`, `judge.model`);
    `previous` is what an earlier attempt of the run resolved it to (run.json), to skip a download."""
    kind = model_kind(ref)
    try:
        if kind == "bundled":
            return _bundled(ref)
        if kind == "store":
            return _from_store(ref, store, where)
        if kind == "local":
            return _local(ref, store, import_key, where)
        if kind == "s3":
            return _s3(ref, store, import_key, where)
        return _hub(ref, store, import_key, where, previous)
    except ModelError:
        raise
    except CaiError as e:  # a store or S3 error while reading the source: still one line, named
        raise ModelError(f"{where}: {ref}: {e}") from None
