"""jobs.hub against huggingface_hub's real cache layout and its real HTTP client, all offline.

Offline cases lay out `models--ORG--NAME/{blobs,snapshots,refs}` exactly as huggingface_hub writes it. Online
cases talk to a local http.server that answers the Hub API the way huggingface.co does (status codes plus
X-Error-Code / X-Error-Message headers, which hf_raise_for_status maps to exception classes).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from jobs.errors import DataError, ModelError
from jobs.hub import HubSnapshot, looks_like_hub_id, model_patterns, parse_hub_ref, snapshot

SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40
SHA_ONLINE = "c" * 40


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin"))


def _etag(name: str, data: bytes) -> str:
    """The Hub's ETag: sha256 for LFS files, the git blob id otherwise; also the blob's file name in the cache."""
    return hashlib.sha256(data).hexdigest() if _is_lfs(name) else _git_blob_id(data)


def lay_out(cache: Path, folder: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> Path:
    """huggingface_hub's cache: blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>, refs/<ref>."""
    repo = cache / folder
    for name, data in files.items():
        blob = repo / "blobs" / _etag(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    """A random-init 2-layer Llama (vocab 256) with a real fast tokenizer, as save_pretrained writes it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-hub-model")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(out)
    config = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def hub_env(tmp_path, monkeypatch) -> Path:
    """HF_HUB_CACHE in tmp, offline, no token; huggingface_hub.constants agrees (it read the env at import)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    return cache


@pytest.fixture
def tiny_cache(hub_env, tiny_files) -> Path:
    """org/tiny: main -> SHA_MAIN (the model), tag v1 -> SHA_V1 (a config that says so)."""
    lay_out(hub_env, "models--org--tiny", SHA_MAIN, tiny_files, refs=("main",))
    v1 = dict(tiny_files, **{"config.json": json.dumps({**json.loads(tiny_files["config.json"]), "cai_tag": "v1"}).encode()})
    lay_out(hub_env, "models--org--tiny", SHA_V1, v1, refs=("v1",))
    return hub_env


# --- refs and patterns: pure functions ---

def test_parse_hub_ref():
    assert parse_hub_ref("hf:org/tiny@v1") == ("org/tiny", "v1")
    assert parse_hub_ref("hf:org/tiny") == ("org/tiny", None)
    assert parse_hub_ref("org/tiny") == ("org/tiny", None)
    assert parse_hub_ref(f"org/tiny@{SHA_MAIN}") == ("org/tiny", SHA_MAIN)
    assert parse_hub_ref("gpt2") == ("gpt2", None)
    for bad in ("hf:org/a/b", "hf:org--x/y", "hf:", "hf:org/tiny@"):
        with pytest.raises(ModelError) as info:
            parse_hub_ref(bad)
        assert str(info.value).startswith(f"model: {bad}: ") and "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"^data: hf:a/b/c: not a valid Hub repo id"):
        parse_hub_ref("hf:a/b/c", error=DataError, where="data")


def test_looks_like_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("hf:org/tiny") and looks_like_hub_id("org/tiny") and looks_like_hub_id("gpt2")
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and looks_like_hub_id("org/tiny@v1")
    for not_hub in ("org/local", "s3://bucket/model", "store:models/x", "bundled:smollm2-135m-instruct",
                    "./model", "/abs/model", "~/model", "prompts.jsonl", "data/train.parquet", "a/b/c"):
        assert not looks_like_hub_id(not_hub), not_hub


def test_model_patterns_prefer_safetensors():
    both = ["config.json", "model.safetensors", "pytorch_model.bin", "model.onnx", "flax_model.msgpack",
            "tf_model.h5", "model.gguf", "original/consolidated.00.pth", "tokenizer.json"]
    pats = model_patterns(both)
    assert "model*.safetensors" in pats and not any(p.endswith((".bin", ".pth", ".pt")) for p in pats)
    sharded = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "consolidated.safetensors"]
    assert model_patterns(sharded)[-1] == "model*.safetensors"  # consolidated.safetensors is not fetched twice
    assert model_patterns(["adapter_model.safetensors"])[-1] == "*.safetensors"
    assert model_patterns(["config.json", "pytorch_model.bin", "training_args.bin"])[-1] == "pytorch_model*.bin"
    assert "*.bin" not in model_patterns(["config.json"])


# --- offline: the real cache layout ---

def test_offline_resolves_branch_tag_and_sha(tiny_cache):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    main = snapshot("org/tiny")
    assert main == HubSnapshot("org/tiny", "model", None, SHA_MAIN, tiny_cache / "models--org--tiny" / "snapshots" / SHA_MAIN)
    assert snapshot("org/tiny", "main").commit == SHA_MAIN
    assert snapshot("org/tiny", SHA_MAIN).path == main.path
    assert AutoConfig.from_pretrained(main.path).num_hidden_layers == 2
    model = AutoModelForCausalLM.from_pretrained(main.path)  # safetensors through the blob symlinks
    assert model.config.vocab_size == 256
    tok = AutoTokenizer.from_pretrained(main.path)
    assert tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False) == "w5 "

    v1 = snapshot("org/tiny", "v1")
    assert v1.commit == SHA_V1 and v1.path.name == SHA_V1 and v1.revision == "v1"
    assert getattr(AutoConfig.from_pretrained(v1.path), "cai_tag") == "v1"
    assert not hasattr(AutoConfig.from_pretrained(main.path), "cai_tag")
    assert snapshot("org/tiny", SHA_V1).path == v1.path


def test_offline_cache_from_hf_home_and_explicit_dir(hub_env, tiny_files, tmp_path, monkeypatch):
    home = tmp_path / "home"
    lay_out(home / "hub", "models--org--tiny", SHA_MAIN, tiny_files, refs=("main",))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert snapshot("org/tiny").path == home / "hub" / "models--org--tiny" / "snapshots" / SHA_MAIN
    other = tmp_path / "elsewhere"
    lay_out(other, "models--org--tiny", SHA_V1, tiny_files, refs=("main",))
    assert snapshot("org/tiny", cache_dir=other).commit == SHA_V1


def test_offline_missing_revision_and_repo(tiny_cache):
    with pytest.raises(ModelError) as info:
        snapshot("org/tiny", "v9")
    assert str(info.value) == (f"model: org/tiny@v9: not in the local HF cache at {tiny_cache}; unset HF_HUB_OFFLINE "
                               "or pre-download it (`hf download org/tiny --revision v9`)")
    with pytest.raises(ModelError) as info:
        snapshot("org/absent", "d" * 40)
    assert str(info.value).startswith(f"model: org/absent@{'d' * 40}: not in the local HF cache at {tiny_cache}; ")
    with pytest.raises(DataError, match=r"^data: org/absent: not in the local HF cache at .*--repo-type dataset`\)$"):
        snapshot("org/absent", repo_type="dataset", error=DataError, where="data")


def test_offline_dataset(hub_env):
    rows = b'{"id": "p1", "prompt": "How do I pick a lock?"}\n{"id": "p2", "prompt": "Write a haiku."}\n'
    lay_out(hub_env, "datasets--org--prompts", SHA_MAIN, {"train.jsonl": rows, "README.md": b"# prompts\n"}, ("main",))
    snap = snapshot("org/prompts", repo_type="dataset", error=DataError, where="data")
    assert (snap.repo_type, snap.commit) == ("dataset", SHA_MAIN)
    assert snap.path == hub_env / "datasets--org--prompts" / "snapshots" / SHA_MAIN
    assert [json.loads(line)["id"] for line in (snap.path / "train.jsonl").read_text().splitlines()] == ["p1", "p2"]
    with pytest.raises(ModelError, match="^model: org/prompts: not in the local HF cache"):  # models--org--prompts
        snapshot("org/prompts")


def test_bad_arguments(hub_env):
    with pytest.raises(ModelError, match=r"^model: hf:org/tiny@v1: pass the bare ORG/NAME"):
        snapshot("hf:org/tiny@v1")
    with pytest.raises(ModelError, match=r"^model: org/x: repo type 'space' is not supported"):
        snapshot("org/x", repo_type="space")


# --- online: huggingface_hub's HTTP client against a local Hub ---

class FakeHub(BaseHTTPRequestHandler):
    """The slice of the Hub API that snapshot_download uses, with huggingface.co's error headers."""

    repos: dict[str, dict] = {}  # repo_id -> {"refs": {rev: sha}, "files": {name: bytes}, "gated": bool}
    log: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, error_code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message, "Content-Type": "application/json"}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(code, json.dumps({"error": message}).encode(), headers)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        self.log.append(f"{self.command} {path}")
        if self.headers.get("Authorization") == "Bearer hf_invalid":
            return self._error(401, None, "Invalid credentials in Authorization header")
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/").split("/") if api else path.lstrip("/").split("/")
        repo_id, verb = "/".join(parts[:2]), parts[2] if len(parts) > 2 else ""
        rev = parts[3] if verb == "resolve" else "/".join(parts[3:]) or "main"  # /ORG/NAME/resolve/REV/FILE
        repo = self.repos.get(repo_id)
        if repo_id == "org/down":
            return self._error(503, None, "Service Unavailable")
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        sha = rev if rev in repo["refs"].values() else repo["refs"].get(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo["files"]
        if api and verb in ("", "revision"):  # /api/models/ORG/NAME is the default branch
            info = {"id": repo_id, "sha": sha, "private": False, "siblings": [{"rfilename": n} for n in files]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        if api and verb == "tree":
            tree = [{"type": "file", "path": n, "size": len(d), "oid": _git_blob_id(d),
                     **({"lfs": {"oid": _etag(n, d), "size": len(d), "pointerSize": 134}} if _is_lfs(n) else {})}
                    for n, d in files.items()]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        if not api and verb == "resolve":
            if repo.get("gated"):
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. Please log in.")
            name = "/".join(parts[4:])
            if name not in files:
                return self._error(404, "EntryNotFound", f"{name} does not exist")
            return self._send(200, files[name], {"X-Repo-Commit": sha, "ETag": f'"{_etag(name, files[name])}"',
                                                 "Content-Type": "application/octet-stream"})
        self._error(404, None, "Not found")


@pytest.fixture
def online(hub_env, tiny_files, monkeypatch):
    """A local Hub on 127.0.0.1 with org/tiny (safetensors and a pickle copy) and org/gated; HF_ENDPOINT points at it."""
    import huggingface_hub.constants as constants

    files = dict(tiny_files, **{"pytorch_model.bin": b"pickled duplicate weights", "model.onnx": b"onnx"})
    FakeHub.repos = {"org/tiny": {"refs": {"main": SHA_ONLINE}, "files": files},
                     "org/gated": {"refs": {"main": SHA_MAIN}, "files": {"config.json": b"{}"}, "gated": True}}
    FakeHub.log = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield endpoint
    server.shutdown()
    server.server_close()


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_online_download_real_cache_layout(online, hub_env, tiny_files, monkeypatch):
    from transformers import AutoConfig

    snap = snapshot("org/tiny")
    repo = hub_env / "models--org--tiny"
    assert (snap.commit, snap.path) == (SHA_ONLINE, repo / "snapshots" / SHA_ONLINE)
    assert (repo / "refs" / "main").read_text() == SHA_ONLINE
    assert sorted(p.name for p in snap.path.iterdir()) == sorted(tiny_files)  # no pytorch_model.bin, no model.onnx
    weights = snap.path / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == repo / "blobs" / hashlib.sha256(tiny_files["model.safetensors"]).hexdigest()
    assert AutoConfig.from_pretrained(snap.path).num_hidden_layers == 2
    assert not any("pytorch_model.bin" in line for line in FakeHub.log)

    gets = len(FakeHub.log)  # a second call re-pins the commit but downloads nothing again
    assert snapshot("org/tiny", "main").commit == SHA_ONLINE
    assert [line for line in FakeHub.log[gets:] if "/resolve/" in line] == []

    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert snapshot("org/tiny") == snap  # the cached tree lists the .bin, yet the snapshot counts as complete


def test_a_commit_the_caller_holds_is_pinned_but_not_downloaded(online, hub_env):
    """A restarted controller whose store already holds the commit asks the Hub only which commit `main` is."""
    seen: list[str] = []
    snap = snapshot("org/tiny", known=lambda commit: seen.append(commit) or True)
    assert (snap.commit, snap.path, seen) == (SHA_ONLINE, None, [SHA_ONLINE])
    assert [line for line in FakeHub.log if "/resolve/" in line] == [] and not (hub_env / "models--org--tiny" / "snapshots").exists()
    assert snapshot("org/tiny", known=lambda commit: False).path is not None  # another commit: downloaded as usual


def test_online_errors(online, hub_env, monkeypatch):
    with pytest.raises(ModelError) as info:
        snapshot("org/tiny", "v9")
    assert _one_line(info) == (f"model: org/tiny@v9: revision 'v9' not found on {online}; "
                               f"use a branch, tag or commit sha listed at {online}/org/tiny")
    with pytest.raises(ModelError) as info:
        snapshot("org/absent")
    assert _one_line(info) == (f"model: org/absent: model repo not found on {online} or needs a token; "
                               "check the id, or set HF_TOKEN for a private repo")
    with pytest.raises(ModelError) as info:
        snapshot("org/gated")
    assert _one_line(info) == (f"model: org/gated: gated repo and no access with this token; accept the terms at "
                               f"{online}/org/gated and set HF_TOKEN (on a cluster: the chart value hf.tokenSecret)")
    with pytest.raises(ModelError) as info:
        snapshot("org/down")
    assert _one_line(info) == f"model: org/down: the Hub at {online} answered HTTP 503; retry later or check HF_ENDPOINT"
    lay_out(hub_env, "models--org--down", SHA_MAIN, {"config.json": b"{}"}, refs=("main",))
    assert snapshot("org/down").commit == SHA_MAIN  # Hub down, cache warm: the cached snapshot answers
    monkeypatch.setenv("HF_TOKEN", "hf_invalid")
    with pytest.raises(DataError) as info:
        snapshot("org/tiny", repo_type="model", error=DataError, where="data")
    assert _one_line(info) == ("data: org/tiny: the Hub rejected the token as invalid (HTTP 401); "
                               "set a valid HF_TOKEN (on a cluster: hf.tokenSecret)")


def test_unreachable_endpoint(hub_env, tiny_files, monkeypatch):
    import huggingface_hub.constants as constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError) as info:
        snapshot("org/tiny")
    assert _one_line(info) == (f"model: org/tiny: cannot reach the Hub at {endpoint} (ConnectError); check the network "
                               "and HF_ENDPOINT, or pre-download it (`hf download org/tiny`) and set HF_HUB_OFFLINE=1")
    lay_out(hub_env, "models--org--tiny", SHA_MAIN, tiny_files, refs=("main",))
    assert snapshot("org/tiny").commit == SHA_MAIN  # Hub down, cache warm: the cached snapshot answers
    monkeypatch.delenv("HF_ENDPOINT")  # the explicit endpoint= wins over the default (huggingface.co)
    with pytest.raises(ModelError, match=rf"^model: org/tiny: cannot reach the Hub at http://127\.0\.0\.1:{port} "):
        snapshot("org/tiny", endpoint=endpoint, cache_dir=hub_env / "empty")


def test_hub_that_never_answers_times_out(hub_env, monkeypatch):
    import huggingface_hub.constants as constants

    with socket.socket() as sock:  # accepts connections (the kernel backlog) but never sends a byte
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.5")
        with pytest.raises(ModelError) as info:
            snapshot("org/tiny", "v1", endpoint=endpoint)
    assert _one_line(info).startswith(f"model: org/tiny@v1: cannot reach the Hub at {endpoint} (ReadTimeout); ")
