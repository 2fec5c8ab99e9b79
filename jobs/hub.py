"""Hugging Face Hub references -> an immutable commit sha and a local snapshot (huggingface_hub's cache layout).

The controller resolves `hf:ORG/NAME@REV` once, pins the commit and imports the snapshot into the artifact
store, so stage pods never talk to the Hub. Env (HF_ENDPOINT, HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE) is read at
call time: huggingface_hub.constants freezes it at import. Every failure is one line: where, ref, what, fix.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CaiError, ModelError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # s3://, store:, bundled:, file://
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".yaml", ".yml", ".txt", ".gguf", ".safetensors", ".arrow")
# What transformers reads besides weights: configs, weight indexes, tokenizers, chat templates, generation config.
# *.py: a repo's own modelling code, loaded only with engine.trust_remote_code (small, and needed then on pods).
MODEL_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
# Weight formats by preference (as vLLM/TGI do): the first the repo has wins, so a repo shipping safetensors
# and pickles downloads only safetensors; `model*` first skips duplicates such as Mistral's consolidated.safetensors.
WEIGHT_FORMATS = (["model*.safetensors"], ["*.safetensors"], ["pytorch_model*.bin"], ["*.bin"], ["*.pt", "*.pth"])


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str  # "ORG/NAME"
    repo_type: str  # "model" | "dataset"
    revision: str | None  # what the user asked for (branch, tag, sha) or None (= "main")
    commit: str  # the 40-hex commit sha it resolved to
    path: Path | None  # local snapshot directory (huggingface_hub's cache layout); None: the caller holds this commit


def _invalid(repo_id: str) -> str | None:
    """huggingface_hub's own id rules (ORG/NAME or NAME, no '--' or '..'), as the first line of its message."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc).splitlines()[0]
    return None


def parse_hub_ref(ref: str, *, error: type[CaiError] = ModelError, where: str = "model") -> tuple[str, str | None]:
    """'hf:ORG/NAME@REV' -> ('ORG/NAME', 'REV'); without '@REV' the revision is None (the Hub's default branch)."""
    repo_id, sep, revision = ref.removeprefix("hf:").partition("@")
    if sep and not revision:
        raise error(f"{where}: {ref}: empty revision after '@'; use ORG/NAME@BRANCH, @TAG or @COMMIT_SHA")
    if (why := _invalid(repo_id)) is not None:
        raise error(f"{where}: {ref}: not a valid Hub repo id ({why}); use hf:ORG/NAME[@REVISION]")
    return repo_id, revision or None


def looks_like_hub_id(ref: str) -> bool:
    """A Hub id unless it is a scheme ref, an existing path, path-like, or names a file (a missing local file)."""
    if ref.startswith("hf:"):
        return True
    if _SCHEME.match(ref) or ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists():
        return False
    repo_id = ref.partition("@")[0]
    return not repo_id.lower().endswith(_FILE_SUFFIXES) and _invalid(repo_id) is None


def model_patterns(files: list[str]) -> list[str]:
    """allow_patterns for a model repo: transformers' small files plus only the best weight format present."""
    for weights in WEIGHT_FORMATS:
        if any(fnmatch.fnmatchcase(f, p) for f in files for p in weights):
            return MODEL_FILES + weights
    return list(MODEL_FILES)


def hub_cache() -> Path:
    """HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default (~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Offline if the env says so now, or said so when huggingface_hub was imported (its requests then refuse)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def snapshot(repo_id: str, revision: str | None = None, *, repo_type: str = "model",
             allow_patterns: list[str] | None = None, error: type[CaiError] = ModelError, where: str = "model",
             cache_dir: str | Path | None = None, endpoint: str | None = None,
             known: Callable[[str], bool] | None = None) -> HubSnapshot:
    """Resolve `revision` to its commit and download (or, offline / Hub unreachable, find cached) that snapshot.
    `known(commit)` True: the caller already holds that commit (imported into the store by an earlier attempt),
    so nothing is downloaded and `path` is None: a restarted controller pod does not fetch 15 GB again."""
    from huggingface_hub import constants

    ref = f"{repo_id}@{revision}" if revision else repo_id
    if repo_type not in ("model", "dataset"):
        raise error(f"{where}: {ref}: repo type {repo_type!r} is not supported; use model or dataset")
    if parse_hub_ref(repo_id, error=error, where=where) != (repo_id, None):
        raise error(f"{where}: {ref}: pass the bare ORG/NAME; split hf:ORG/NAME@REV with parse_hub_ref first")
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache()
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    try:
        if hub_offline():
            return _cached(repo_id, revision, repo_type, allow_patterns, cache)
        try:
            return _download(repo_id, revision, repo_type, allow_patterns, cache, endpoint, known)
        except Exception as exc:
            if not _unreachable(exc):
                raise
            try:  # the Hub is down or unreachable: a snapshot cached earlier still answers
                return _cached(repo_id, revision, repo_type, allow_patterns, cache)
            except FileNotFoundError:  # LocalEntryNotFoundError: nothing cached, so report the Hub failure
                raise exc
    except CaiError:
        raise
    except Exception as exc:
        what = _explain(exc, repo_id, revision, repo_type, cache, endpoint)
        if what is None:
            raise
        raise error(f"{where}: {ref}: {what}") from exc


def _download(repo_id: str, revision: str | None, repo_type: str, allow_patterns: list[str] | None,
              cache: Path, endpoint: str, known: Callable[[str], bool] | None = None) -> HubSnapshot:
    """One repo_info call pins the commit and lists files; the snapshot is then fetched at that sha only."""
    from huggingface_hub import HfApi, constants, snapshot_download

    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or constants.HF_HUB_ETAG_TIMEOUT)  # no default: hangs
    api = HfApi(endpoint=endpoint)
    info = api.repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=timeout)
    if known is not None and known(info.sha):
        return HubSnapshot(repo_id, repo_type, revision, info.sha, None)
    if allow_patterns is None and repo_type == "model":
        files = [s.rfilename for s in info.siblings or []]
        if info.siblings is None:  # the Hub lists siblings in repo_info; a mirror might not
            files = api.list_repo_files(repo_id, repo_type=repo_type, revision=info.sha)
        allow_patterns = model_patterns(files)
    path = Path(snapshot_download(repo_id, repo_type=repo_type, revision=info.sha, cache_dir=cache,
                                  allow_patterns=allow_patterns, endpoint=endpoint, etag_timeout=timeout))
    if revision != info.sha:  # written after the download, so an offline ref never points at a partial snapshot
        _write_ref(path.parent.parent / "refs" / (revision or "main"), info.sha)
    return HubSnapshot(repo_id, repo_type, revision, info.sha, path)


def _cached(repo_id: str, revision: str | None, repo_type: str, allow_patterns: list[str] | None,
            cache: Path) -> HubSnapshot:
    """The cached snapshot for `revision` (refs/<rev> or snapshots/<sha>), with the same patterns as online."""
    from huggingface_hub import snapshot_download

    if allow_patterns is None and repo_type == "model":
        try:  # the cached tree listing (huggingface_hub >= 2) lets the completeness check skip unfetched weights
            from huggingface_hub import get_cached_repo_tree

            tree = get_cached_repo_tree(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache)
            allow_patterns = model_patterns([f.path for f in tree])
        except Exception:  # no listing (older version, hand-made or transformers-made cache): take the snapshot as is
            pass
    path = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache,
                                  allow_patterns=allow_patterns, local_files_only=True))
    return HubSnapshot(repo_id, repo_type, revision, path.name, path)


def _write_ref(path: Path, commit: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text().strip() != commit:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, path)


def _is_transport(exc: BaseException | None) -> bool:
    """httpx/httpx2 connection errors and timeouts, by name: huggingface_hub 1.x uses httpx, 2.x httpx2."""
    return exc is not None and any(c.__name__ in ("TransportError", "TimeoutException") for c in type(exc).__mro__)


def _unreachable(exc: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, HfHubHTTPError):
        return exc.response is not None and exc.response.status_code >= 500
    return isinstance(exc, OfflineModeIsEnabled) or _is_transport(exc) or _is_transport(exc.__cause__)


def _explain(exc: Exception, repo_id: str, revision: str | None, repo_type: str, cache: Path,
             endpoint: str) -> str | None:
    """One line `<what>; <fix>` for the failures a user can fix, else None (the traceback is the better report)."""
    from huggingface_hub import errors

    page = f"{endpoint}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    download = f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    download += f" --revision {revision}" if revision else ""
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"revision {revision or 'main'!r} not found on {endpoint}; use a branch, tag or commit sha listed at {page}"
    if isinstance(exc, errors.GatedRepoError):
        return (f"gated repo and no access with this token; accept the terms at {page} and set HF_TOKEN "
                "(on a cluster: the chart value hf.tokenSecret)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{repo_type} repo not found on {endpoint} or needs a token; check the id, or set HF_TOKEN for a private repo"
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return "the Hub rejected the token as invalid (HTTP 401); set a valid HF_TOKEN (on a cluster: hf.tokenSecret)"
        if status == 403:
            return f"the token may not read this repo (HTTP 403); give HF_TOKEN read access to {page}"
        return f"the Hub at {endpoint} answered HTTP {status}; retry later or check HF_ENDPOINT"
    if _is_transport(exc) or _is_transport(exc.__cause__):
        name = type(exc if _is_transport(exc) else exc.__cause__).__name__
        return (f"cannot reach the Hub at {endpoint} ({name}); check the network and HF_ENDPOINT, "
                f"or pre-download it (`{download}`) and set HF_HUB_OFFLINE=1")
    if isinstance(exc, getattr(errors, "IncompleteSnapshotError", ())):
        return f"the cached snapshot in {cache} is incomplete; unset HF_HUB_OFFLINE to finish it, or `{download}`"
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return f"not in the local HF cache at {cache}; unset HF_HUB_OFFLINE or pre-download it (`{download}`)"
    if isinstance(exc, OSError):
        return f"cannot write the HF cache at {cache} ({exc.strerror or exc}); free space or set HF_HUB_CACHE elsewhere"
    return None
