"""S3Store against a real S3 server (SeaweedFS): the store contract shared with LocalStore, multipart,
the local directory cache, conditional creates under a race, one-line errors, retries on real faults."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from jobs.errors import StoreError
from jobs.store import LocalStore, open_store, split_uri
from jobs.store_s3 import MIB, S3Store

PREFIX = "team/cai"


class Boom(RuntimeError):
    pass


@pytest.fixture
def s3_store(s3_bucket, tmp_path):
    store = S3Store(f"s3://{s3_bucket}/{PREFIX}/", cache_root=tmp_path / "cache")
    yield store
    store.close()


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    """The same behaviour tests run against both stores."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def count_calls(store: S3Store, operation: str) -> list[str]:
    """Record each `operation` the store's real client sends (botocore's event hooks)."""
    seen: list[str] = []
    store._client.meta.events.register(f"before-call.s3.{operation}", lambda params, **kw: seen.append(params["url_path"]))
    return seen


def make_tree(root: Path, big: int = 0) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "weights.bin").write_bytes(b"\x00\x01\x02")
    (root / "sub" / "deeper" / "tok.txt").write_text("tokens")
    if big:
        (root / "model.safetensors").write_bytes(os.urandom(big))
    return root


def files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


# --- the store contract, both stores -----------------------------------------------------------


def test_round_trips(any_store):
    data = bytes(range(256)) * 3
    any_store.write_bytes("a/b/c.bin", data)
    assert any_store.read_bytes("a/b/c.bin") == data
    assert any_store.sha256("a/b/c.bin") == hashlib.sha256(data).hexdigest()
    any_store.write_bytes("a/b/c.bin", b"second")
    assert any_store.read_bytes("a/b/c.bin") == b"second"
    obj = {"b": [1, 2.5, None, True], "a": {"nested": "ü"}}
    any_store.write_json("x/obj.json", obj)
    assert any_store.read_json("x/obj.json") == obj
    rows = [{"id": i, "text": f"row {i} – ✓ \u2028 \r"} for i in range(300)]
    assert any_store.write_jsonl("r/rows.jsonl", iter(rows)) == 300
    assert list(any_store.iter_jsonl("r/rows.jsonl")) == rows
    any_store.write_text("t.txt", "no newline at end\nlast")
    assert list(any_store.iter_lines("t.txt")) == ["no newline at end\n", "last"]
    assert any_store.exists("a/b/c.bin") and any_store.exists("a/b") and not any_store.exists("a/b/d.bin")


def test_read_missing_is_one_line(any_store):
    with pytest.raises(StoreError) as info:
        any_store.read_bytes("nope/missing.json")
    msg = str(info.value)
    assert msg == f"{any_store.uri_for('nope/missing.json')}: not found"
    for op in (lambda: any_store.sha256("nope"), lambda: list(any_store.iter_lines("nope"))):
        with pytest.raises(StoreError, match="not found"):
            op()


def test_list_under_prefix(any_store):
    for key in ["runs/b/x.json", "runs/a/z.json", "runs/a/sub/y.json", "runs-other/o.txt", "runs/a/a.json"]:
        any_store.write_text(key, "1")
    assert any_store.list("runs") == ["runs/a/a.json", "runs/a/sub/y.json", "runs/a/z.json", "runs/b/x.json"]
    assert any_store.list("runs/") == any_store.list("/runs")
    assert any_store.list("runs/a/sub") == ["runs/a/sub/y.json"]
    assert any_store.list("runs/a/x") == []  # a prefix of a name is not a directory
    assert any_store.list("runs/a/z.json") == ["runs/a/z.json"]
    assert any_store.list("") == sorted(any_store.list("runs") + ["runs-other/o.txt"])
    assert any_store.list("nothing/here") == []


def test_delete_file_and_tree(any_store):
    for key in ["d/one.txt", "d/sub/two.txt", "dx/keep.txt"]:
        any_store.write_text(key, "1")
    any_store.delete("d/one.txt")
    assert any_store.list("") == ["d/sub/two.txt", "dx/keep.txt"]
    any_store.delete("d")
    assert any_store.list("") == ["dx/keep.txt"] and not any_store.exists("d")
    any_store.delete("never/existed")


def test_create_only(any_store):
    assert any_store.create_only("locks/run.lock", b"first") is True
    assert any_store.create_only("locks/run.lock", b"second") is False
    assert any_store.read_bytes("locks/run.lock") == b"first"
    any_store.write_text("m.json", "{}")
    assert any_store.create_only("m.json", b"other") is False and any_store.read_text("m.json") == "{}"


def test_create_only_race_has_exactly_one_winner(any_store):
    """Two (or eight) stages finishing at once: exactly one manifest write succeeds, and it is whole."""
    for trial, writers in enumerate((2, 8, 8)):
        barrier, wins = threading.Barrier(writers), []

        def write(i: int) -> None:
            barrier.wait()
            if any_store.create_only(f"race/{trial}/stage.json", f"writer {i} ".encode() * 5000):
                wins.append(i)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, wins
        assert any_store.read_bytes(f"race/{trial}/stage.json") == f"writer {wins[0]} ".encode() * 5000


def test_open_writer_commits_only_on_success(any_store):
    any_store.write_text("w/out.txt", "old complete content\n")
    with pytest.raises(Boom):
        with any_store.open_writer("w/out.txt") as f:
            f.write("new partial")
            raise Boom
    assert any_store.read_text("w/out.txt") == "old complete content\n"
    with pytest.raises(KeyboardInterrupt):
        with any_store.open_writer("w/new.jsonl") as f:
            f.write('{"half": ')
            raise KeyboardInterrupt
    assert any_store.list("w") == ["w/out.txt"]
    with any_store.open_writer("w/new.jsonl") as f:
        f.write("part 1\n")
        assert not any_store.exists("w/new.jsonl"), "visible before commit"
        f.write("part 2\n")
    assert any_store.read_text("w/new.jsonl") == "part 1\npart 2\n"


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/../x", ".."])
def test_keys_escaping_root_raise(any_store, key):
    for op in (lambda: any_store.write_bytes(key, b"x"), lambda: any_store.read_bytes(key),
               lambda: any_store.exists(key), lambda: any_store.list(key), lambda: any_store.delete(key)):
        with pytest.raises(StoreError, match="escapes the store root"):
            op()


def test_put_dir_local_dir_and_replace(any_store, tmp_path):
    src = make_tree(tmp_path / "model")
    any_store.put_dir(src, "runs/x/model")
    local = any_store.local_dir("runs/x/model")
    assert files(local) == files(src)
    assert any_store.list("runs/x/model") == [f"runs/x/model/{k}" for k in sorted(files(src))]
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "config.json").write_text('{"a": 2}')
    any_store.put_dir(v2, "runs/x/model")
    assert any_store.list("runs/x/model") == ["runs/x/model/config.json"]
    assert files(any_store.local_dir("runs/x/model")) == files(v2)
    with pytest.raises(StoreError, match="directory not found"):
        any_store.local_dir("runs/x/nothing")


# --- S3 only: layout, URIs, multipart, the local cache ------------------------------------------


def test_objects_land_under_the_prefix(s3_store, s3_server, s3_bucket):
    assert s3_store.uri == f"s3://{s3_bucket}/{PREFIX}"
    assert s3_store.uri_for("runs/r/run.json") == f"s3://{s3_bucket}/{PREFIX}/runs/r/run.json"
    s3_store.write_text("runs/r/run.json", "{}")
    listed = s3_server.admin().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"{PREFIX}/runs/r/run.json"]
    store, key = split_uri(f"s3://{s3_bucket}/{PREFIX}/runs/r/run.json")
    assert isinstance(store, S3Store) and (store.bucket, store.prefix, key) == (s3_bucket, PREFIX, "runs/r/run.json")
    assert store.read_json(key) == {}
    bare = open_store(f"s3://{s3_bucket}")
    assert bare.prefix == "" and bare.list("") == [f"{PREFIX}/runs/r/run.json"]


def test_endpoint_comes_from_the_environment(s3_store, s3_server):
    """boto3 itself honours AWS_ENDPOINT_URL_S3 (and AWS_ENDPOINT_URL); the store adds nothing."""
    assert s3_store.endpoint == s3_server.endpoint


def test_generic_endpoint_variable(s3_bucket, s3_server, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    store = S3Store(f"s3://{s3_bucket}/p", cache_root=tmp_path)
    store.write_text("k", "v")
    assert store.endpoint == s3_server.endpoint and store.read_text("k") == "v"
    store.close()


def test_big_files_go_multipart(s3_bucket, s3_server, tmp_path):
    """A 9 MiB safetensors file and a 6 MiB streamed file travel in 5 MiB parts (ETag `-<parts>`)."""
    store = S3Store(f"s3://{s3_bucket}/{PREFIX}", multipart_threshold=5 * MIB, cache_root=tmp_path / "cache")
    src = make_tree(tmp_path / "model", big=9 * MIB)
    store.put_dir(src, "runs/x/train/model")
    with store.open_writer("runs/x/big.jsonl") as f:
        for i in range(6 * 1024):
            f.write(f'{{"i": {i}, "pad": "{"x" * 1000}"}}\n')
    admin = s3_server.admin()
    head = admin.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/runs/x/train/model/model.safetensors")
    assert head["ETag"].strip('"').endswith("-2") and head["ContentLength"] == 9 * MIB
    assert admin.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/runs/x/big.jsonl")["ETag"].strip('"').endswith("-2")
    assert files(store.local_dir("runs/x/train/model")) == files(src)
    assert sum(1 for _ in store.iter_jsonl("runs/x/big.jsonl")) == 6 * 1024
    store.close()


def test_local_dir_cache_is_reused_then_refreshed(s3_store, tmp_path, s3_bucket):
    s3_store.put_dir(make_tree(tmp_path / "model"), "runs/x/model")
    gets = count_calls(s3_store, "GetObject")
    first = s3_store.local_dir("runs/x/model")
    assert first == tmp_path / "cache" / s3_bucket / PREFIX / "runs/x/model"
    assert len(gets) == 3
    inode = (first / "config.json").stat().st_ino
    assert s3_store.local_dir("runs/x/model") == first and len(gets) == 3  # unchanged objects: no download
    assert (first / "config.json").stat().st_ino == inode

    other = S3Store(s3_store.uri, cache_root=tmp_path / "cache")  # a later process on the same machine
    other_gets = count_calls(other, "GetObject")
    assert other.local_dir("runs/x/model") == first and other_gets == []
    other.close()

    s3_store.write_text("runs/x/model/config.json", '{"a": 2}')  # the tree changed in the bucket
    assert s3_store.local_dir("runs/x/model") == first
    assert (first / "config.json").read_text() == '{"a": 2}' and len(gets) == 6
    assert sorted(p.name for p in first.parent.iterdir() if p.name.endswith(".tmp")) == []


def test_sha256_of_uploaded_tree_needs_no_download(s3_store, tmp_path):
    """The manifest hashes every model file after put_dir: one HEAD each, not a second transfer."""
    src = make_tree(tmp_path / "model", big=MIB)
    s3_store.put_dir(src, "runs/x/model")
    gets = count_calls(s3_store, "GetObject")
    assert {k: s3_store.sha256(f"runs/x/model/{k}") for k in files(src)} == files(src) and gets == []
    s3_store.write_bytes("runs/x/model/model.safetensors", b"replaced")  # rewritten by cai: its sha256 rides along
    assert s3_store.sha256("runs/x/model/model.safetensors") == hashlib.sha256(b"replaced").hexdigest()
    assert gets == []
    fresh = S3Store(s3_store.uri, cache_root=tmp_path / "cache")  # another process: nothing remembered, metadata only
    fresh_gets = count_calls(fresh, "GetObject")
    assert {k: fresh.sha256(f"runs/x/model/{k}") for k in files(src) if k != "model.safetensors"} == \
        {k: v for k, v in files(src).items() if k != "model.safetensors"} and fresh_gets == []
    # overwritten by another tool (no metadata, or stale metadata dropped by the new PUT): read it again
    s3_store._client.put_object(Bucket=s3_store.bucket, Key=s3_store._k("runs/x/model/model.safetensors"), Body=b"foreign")
    assert fresh.sha256("runs/x/model/model.safetensors") == hashlib.sha256(b"foreign").hexdigest()
    assert len(fresh_gets) == 1
    assert fresh.digest("runs/x/model") != s3_store.digest("runs/x/nothing") and s3_store.digest("runs/x/nothing") is None
    fresh.close()


def test_failed_download_never_looks_complete(s3_store, tmp_path):
    s3_store.put_dir(make_tree(tmp_path / "model"), "runs/x/model")
    calls = []

    def fail_second(**kw):
        calls.append(1)
        if len(calls) == 2:
            raise Boom("connection lost mid-tree")

    s3_store._client.meta.events.register("before-call.s3.GetObject", fail_second)
    with pytest.raises(Boom):
        s3_store.local_dir("runs/x/model")
    parent = s3_store.cache_root / s3_store.bucket / PREFIX / "runs/x"
    assert sorted(p.name for p in parent.iterdir()) == [".model.lock"]  # no dest, no marker, no temp dir
    s3_store._client.meta.events.unregister("before-call.s3.GetObject", fail_second)
    assert files(s3_store.local_dir("runs/x/model")) == files(tmp_path / "model")


def test_create_only_retries_a_conditional_conflict(s3_store):
    """S3 answers 409 ConditionalRequestConflict while a racing conditional write is in flight:
    ask again, and the real answer (created, or 412 exists) decides."""
    from botocore.awsrequest import AWSResponse

    conflicts = []

    def conflict_once(request, **kw):
        if request.method == "PUT" and not conflicts:
            conflicts.append(request.url)
            body = b"<Error><Code>ConditionalRequestConflict</Code><Message>retry</Message></Error>"
            return AWSResponse(request.url, 409, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    s3_store.client.meta.events.register("before-send.s3.PutObject", conflict_once)
    assert s3_store.create_only("m/stage.json", b"1") is True and len(conflicts) == 1
    assert s3_store.create_only("m/stage.json", b"2") is False
    assert s3_store.read_bytes("m/stage.json") == b"1"


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **kw):
        yield self.body


# --- errors: one line, naming the thing and the fix ----------------------------------------------


def one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_bucket(s3_env, tmp_path):
    store = S3Store("s3://no-such-bucket-cai/p", cache_root=tmp_path)
    for op in (lambda: store.read_bytes("k"), lambda: store.write_text("k", "v"), lambda: store.exists("k")):
        with pytest.raises(StoreError) as info:
            op()
        msg = one_line(info)
        assert msg.startswith("s3://no-such-bucket-cai: bucket does not exist at http://127.0.0.1:")
        assert "aws s3 mb s3://no-such-bucket-cai" in msg
    store.close()


@pytest.mark.parametrize("var, value, code", [
    ("AWS_SECRET_ACCESS_KEY", "wrong-secret", "SignatureDoesNotMatch"),
    ("AWS_ACCESS_KEY_ID", "nobody", "InvalidAccessKeyId"),
])
def test_wrong_credentials(s3_bucket, monkeypatch, tmp_path, var, value, code):
    monkeypatch.setenv(var, value)
    store = S3Store(f"s3://{s3_bucket}/p", cache_root=tmp_path)
    with pytest.raises(StoreError) as info:
        store.read_bytes("k")
    assert one_line(info) == (f"s3://{s3_bucket}/p: credentials rejected by {store.endpoint} ({code}); "
                              "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    store.close()


def test_no_credentials(s3_env, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store("s3://b-cai/p", cache_root=tmp_path)
    with pytest.raises(StoreError) as info:
        store.list("runs")
    assert one_line(info).startswith("s3://b-cai/p: no AWS credentials found; set AWS_ACCESS_KEY_ID")


def test_unknown_profile(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StoreError) as info:
        S3Store("s3://b-cai/p")
    assert one_line(info) == "s3://b-cai/p: cannot set up the S3 client: The config profile (no-such-profile) could not be found"


def test_unreachable_endpoint(s3_env, monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = S3Store("s3://b-cai/p", cache_root=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.write_text("k", "v")
    assert one_line(info).startswith(f"s3://b-cai/p: S3 endpoint http://127.0.0.1:{port} unreachable (EndpointConnectionError)")
    assert "AWS_ENDPOINT_URL_S3" in str(info.value) and time.monotonic() - t0 < 15
    assert info.value.exit_code == 75  # transient: the pod failure policies retry it
    store.close()


def test_cli_prints_store_errors_as_one_line(s3_env, tmp_path, capsys):
    from jobs.cli import main

    code = main(["status", "some-run", "--store", "s3://no-such-bucket-cai/p"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "bucket does not exist" in err


def test_boto3_missing_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_boto(name, *a, **kw):
        if name.split(".")[0] in ("boto3", "botocore"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_boto)
    with pytest.raises(StoreError) as info:
        open_store("s3://b-cai/p")
    assert one_line(info) == "s3:// stores need boto3; run `pip install 'cai-jobs[s3]'`"


# --- retries on real network faults ----------------------------------------------------------------


class FlakyProxy:
    """A TCP proxy in front of the server whose first `fail` connections are cut (the request is read,
    then the socket closes with no answer) or answered 503 Slow Down; later ones pass through."""

    def __init__(self, upstream: str, fail: int, mode: str):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream, self.fail, self.mode = (host, int(port)), fail, mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = self.failed = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.failed < self.fail:
                self.failed += 1
                conn.recv(65536)
                if self.mode == "503":
                    conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 59\r\n"
                                 b"Connection: close\r\n\r\n<Error><Code>SlowDown</Code><Message>x</Message></Error>")
                conn.close()
                continue
            up = socket.create_connection(self.upstream)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", ["drop", "503"])
def test_transient_faults_are_retried(s3_bucket, s3_server, monkeypatch, tmp_path, mode):
    proxy = FlakyProxy(s3_server.endpoint, fail=2, mode=mode)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    store = S3Store(f"s3://{s3_bucket}/p", cache_root=tmp_path)
    try:
        store.write_text("runs/r/run.json", '{"ok": true}')  # the bucket check meets both faults, then passes
        assert proxy.failed == 2 and proxy.connections >= 3
        assert s3_server.admin().get_object(Bucket=s3_bucket, Key="p/runs/r/run.json")["Body"].read() == b'{"ok": true}'
    finally:
        store.close()
        proxy.close()


def test_persistent_faults_give_up_with_one_line(s3_bucket, s3_server, monkeypatch, tmp_path):
    proxy = FlakyProxy(s3_server.endpoint, fail=100, mode="503")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = S3Store(f"s3://{s3_bucket}/p", cache_root=tmp_path)
    try:
        with pytest.raises(StoreError) as info:
            store.read_bytes("k")
        assert one_line(info).startswith(f"s3://{s3_bucket}/p: S3 ListObjectsV2 unavailable (SlowDown")
        assert info.value.exit_code == 75  # still failing after the client's retries: the pod is retried
        assert proxy.failed == 2
    finally:
        store.close()
        proxy.close()


# --- idempotent conditional writes ---------------------------------------------------------------


def test_a_landed_create_only_put_answered_412_on_retry_is_ours(s3_store):
    """The first attempt reaches the server and lands, its response is lost; botocore retries, the
    retry gets 412, and the read-back finds our own bytes: success, not someone else's write."""
    import urllib3
    from botocore.exceptions import EndpointConnectionError

    sent = []

    def land_then_drop(request, **kw):
        if request.method == "PUT" and not sent:
            sent.append(urllib3.PoolManager().request(request.method, request.url, body=request.body, headers=dict(request.headers)).status)
            raise EndpointConnectionError(endpoint_url=request.url)  # the response never arrives
        return None

    s3_store.client.meta.events.register("before-send.s3.PutObject", land_then_drop)
    assert s3_store.create_only("locks/a.json", b'{"token": "mine"}') is True
    assert sent == [200] and s3_store.read_bytes("locks/a.json") == b'{"token": "mine"}'
    assert s3_store.create_only("locks/a.json", b'{"token": "theirs"}') is False  # another writer's bytes: refused


def test_local_create_only_is_idempotent_too(tmp_path):
    store = LocalStore(tmp_path / "s")
    assert store.create_only("k.json", b"mine") is True
    assert store.create_only("k.json", b"mine") is True and store.create_only("k.json", b"theirs") is False


def test_an_endpoint_that_ignores_if_none_match_is_refused(s3_store):
    s3_store.check_conditional_writes()  # SeaweedFS honours it

    def drop_condition(params, **kw):
        params["headers"].pop("If-None-Match", None)  # what a server that ignores the header sees

    ignoring = S3Store(s3_store.uri, client=s3_store._client)
    ignoring._client.meta.events.register("before-call.s3.PutObject", drop_condition)
    with pytest.raises(StoreError, match="ignores conditional writes"):
        ignoring.check_conditional_writes()
    assert not [k for k in ignoring.list("_cai") if "probe" in k]  # the probe cleans up after itself


def test_replace_if_is_a_compare_and_swap_on_both_stores(s3_store, tmp_path):
    for store in (s3_store, LocalStore(tmp_path / "s")):
        assert store.replace_if("cas/k", b"new", expected=b"old") is False  # nothing there: nothing to replace
        store.write_bytes("cas/k", b"old")
        assert store.replace_if("cas/k", b"new", expected=b"other") is False and store.read_bytes("cas/k") == b"old"
        assert store.replace_if("cas/k", b"new", expected=b"old") is True and store.read_bytes("cas/k") == b"new"
        assert store.replace_if("cas/k", b"new", expected=b"old") is True  # already ours: a retry of a landed write


def test_a_landed_replace_if_put_answered_412_on_retry_is_ours(s3_store):
    """A renewal's PUT If-Match lands, its response is lost, the retry gets 412 (the ETag moved on, to
    ours): the read-back finds our bytes, so the renewal succeeded."""
    import urllib3
    from botocore.exceptions import EndpointConnectionError

    s3_store.write_bytes("locks/b.json", b'{"n": 1}')
    sent = []

    def land_then_drop(request, **kw):
        if request.method == "PUT" and not sent:
            sent.append(urllib3.PoolManager().request(request.method, request.url, body=request.body, headers=dict(request.headers)).status)
            raise EndpointConnectionError(endpoint_url=request.url)
        return None

    s3_store.client.meta.events.register("before-send.s3.PutObject", land_then_drop)
    assert s3_store.replace_if("locks/b.json", b'{"n": 2}', expected=b'{"n": 1}') is True
    assert sent == [200] and s3_store.read_bytes("locks/b.json") == b'{"n": 2}'


def test_an_endpoint_that_ignores_if_match_is_refused(s3_store):
    def drop_if_match(params, **kw):
        params["headers"].pop("If-Match", None)

    ignoring = S3Store(s3_store.uri, client=s3_store._client)
    ignoring._client.meta.events.register("before-call.s3.PutObject", drop_if_match)
    with pytest.raises(StoreError, match="a PUT If-Match on a wrong ETag succeeded"):
        ignoring.check_conditional_writes()


def test_the_lock_client_has_a_short_worst_case(s3_server, s3_bucket, tmp_path, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "6")  # the default
    store = S3Store(f"s3://{s3_bucket}/p", cache_root=tmp_path)
    control = store.for_control()
    # data calls: 6 tries x (10 s + 120 s) + backoff; lock calls: 3 tries x (5 s + 10 s) + 2 + 4 s
    assert store.worst_call_s() == 830.0 and control.worst_call_s() == 51.0
    control.write_bytes("x", b"1")
    assert store.read_bytes("x") == b"1"
