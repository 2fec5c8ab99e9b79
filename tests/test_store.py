"""LocalStore: round-trips, atomic writes, create-only, listing, key safety, trees, URIs, modes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from jobs.errors import ConfigError, StoreError
from jobs.store import LocalStore, open_store, split_uri


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if ".tmp" in p.name)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Boom(RuntimeError):
    pass


# --- round trips -------------------------------------------------------------------------------


def test_bytes_round_trip(store):
    data = bytes(range(256)) * 3
    store.write_bytes("a/b/c.bin", data)
    assert store.read_bytes("a/b/c.bin") == data
    assert (store.root / "a" / "b" / "c.bin").read_bytes() == data
    assert store.exists("a/b/c.bin") and not store.exists("a/b/d.bin")
    assert store.sha256("a/b/c.bin") == hashlib.sha256(data).hexdigest()


def test_overwrite_replaces(store):
    store.write_bytes("k", b"first, longer content")
    store.write_bytes("k", b"second")
    assert store.read_bytes("k") == b"second"
    assert leftovers(store.root) == []


def test_text_and_json_round_trip(store):
    store.write_text("t.txt", "héllo\nwörld")
    assert store.read_text("t.txt") == "héllo\nwörld"
    obj = {"b": [1, 2.5, None, True], "a": {"nested": "ü"}, "z": ""}
    store.write_json("x/obj.json", obj)
    assert store.read_json("x/obj.json") == obj
    raw = (store.root / "x" / "obj.json").read_text(encoding="utf-8")
    assert raw.endswith("\n") and "ü" in raw  # not ASCII-escaped
    assert raw.index('"a"') < raw.index('"b"') < raw.index('"z"')  # sorted keys: stable bytes


def test_jsonl_round_trip(store):
    rows = [{"id": i, "text": f"row {i} – ✓", "nested": {"x": [i]}} for i in range(50)]
    assert store.write_jsonl("r/rows.jsonl", iter(rows)) == 50
    assert list(store.iter_jsonl("r/rows.jsonl")) == rows
    lines = store.read_text("r/rows.jsonl").splitlines()
    assert len(lines) == 50 and json.loads(lines[7]) == rows[7]


def test_jsonl_empty(store):
    assert store.write_jsonl("empty.jsonl", []) == 0
    assert store.exists("empty.jsonl")
    assert list(store.iter_jsonl("empty.jsonl")) == []


def test_iter_jsonl_skips_blank_lines_and_reports_bad_line(store):
    store.write_text("r.jsonl", '{"a": 1}\n\n{"a": 2}\n{oops\n')
    it = store.iter_jsonl("r.jsonl")
    assert next(it) == {"a": 1}
    assert next(it) == {"a": 2}
    with pytest.raises(StoreError) as info:
        next(it)
    msg = str(info.value)
    assert "line 4" in msg and "r.jsonl" in msg and "\n" not in msg


def test_read_missing_raises_store_error(store):
    with pytest.raises(StoreError) as info:
        store.read_bytes("nope/missing.json")
    assert "not found" in str(info.value)
    assert str(info.value).startswith(store.uri_for("nope/missing.json"))


def test_read_json_invalid(store):
    store.write_text("bad.json", "{not json")
    with pytest.raises(StoreError) as info:
        store.read_json("bad.json")
    assert "invalid JSON" in str(info.value) and "bad.json" in str(info.value)


def test_delete_file_and_tree(store):
    store.write_text("d/one.txt", "1")
    store.write_text("d/sub/two.txt", "2")
    store.write_text("keep.txt", "k")
    store.delete("d/one.txt")
    assert not store.exists("d/one.txt") and store.exists("d/sub/two.txt")
    store.delete("d")
    assert not store.exists("d") and store.exists("keep.txt")
    store.delete("never/existed")  # no error


def test_uri_for(store):
    assert store.uri == str(store.root)
    assert store.uri_for("runs/x/run.json") == f"{store.root}/runs/x/run.json"


def test_root_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = LocalStore("rel/store")
    assert s.root == (tmp_path / "rel" / "store").resolve()
    s.write_text("x", "y")
    assert (tmp_path / "rel" / "store" / "x").read_text() == "y"


# --- atomicity ---------------------------------------------------------------------------------


def test_open_writer_commits_on_success(store):
    with store.open_writer("w/out.txt") as f:
        f.write("part 1\n")
        assert not store.exists("w/out.txt"), "visible before commit"
        assert store.list("w") == [], "temp file listed while writing"
        f.write("part 2\n")
    assert store.read_text("w/out.txt") == "part 1\npart 2\n"
    assert leftovers(store.root) == []


def test_open_writer_crash_leaves_nothing(store):
    with pytest.raises(Boom):
        with store.open_writer("w/out.jsonl") as f:
            f.write('{"half": ')
            raise Boom("crash mid-write")
    assert not store.exists("w/out.jsonl")
    assert not (store.root / "w" / "out.jsonl").exists()
    assert all_files(store.root) == []
    assert leftovers(store.root) == []


def test_open_writer_keyboard_interrupt_leaves_nothing(store):
    with pytest.raises(KeyboardInterrupt):
        with store.open_writer("w/out.txt") as f:
            f.write("x")
            raise KeyboardInterrupt
    assert all_files(store.root) == []


def test_open_writer_crash_keeps_old_content(store):
    store.write_text("w/out.txt", "old complete content\n")
    with pytest.raises(Boom):
        with store.open_writer("w/out.txt") as f:
            f.write("new partial")
            raise Boom
    assert store.read_text("w/out.txt") == "old complete content\n"
    assert all_files(store.root) == ["w/out.txt"]


def test_write_jsonl_crash_in_generator(store):
    store.write_jsonl("r.jsonl", [{"v": "old"}])

    def rows():
        yield {"v": 1}
        yield {"v": 2}
        raise Boom("producer failed")

    with pytest.raises(Boom):
        store.write_jsonl("r.jsonl", rows())
    assert list(store.iter_jsonl("r.jsonl")) == [{"v": "old"}]
    assert leftovers(store.root) == []


def test_write_bytes_failure_keeps_old_and_cleans_up(store, monkeypatch):
    store.write_bytes("k.bin", b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        store.write_bytes("k.bin", b"new")
    monkeypatch.undo()
    assert store.read_bytes("k.bin") == b"old"
    assert all_files(store.root) == ["k.bin"]


def test_write_bytes_failure_new_key_leaves_nothing(store, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        store.write_bytes("new/k.bin", b"data")
    monkeypatch.undo()
    assert not store.exists("new/k.bin")
    assert all_files(store.root) == []


# --- create_only -------------------------------------------------------------------------------


def test_create_only(store):
    assert store.create_only("locks/run.lock", b"first") is True
    assert store.create_only("locks/run.lock", b"second") is False
    assert store.read_bytes("locks/run.lock") == b"first"
    assert all_files(store.root) == ["locks/run.lock"]


def test_create_only_does_not_replace_normal_write(store):
    store.write_text("m.json", "{}")
    assert store.create_only("m.json", b"other") is False
    assert store.read_text("m.json") == "{}"
    assert leftovers(store.root) == []


# --- listing -----------------------------------------------------------------------------------


def test_list_sorted_and_recursive(store):
    for key in ["runs/b/x.json", "runs/a/z.json", "runs/a/sub/y.json", "other/o.txt", "runs/a/a.json"]:
        store.write_text(key, "1")
    assert store.list("runs") == ["runs/a/a.json", "runs/a/sub/y.json", "runs/a/z.json", "runs/b/x.json"]
    assert store.list("runs/") == store.list("runs")
    assert store.list("runs/a/sub") == ["runs/a/sub/y.json"]
    assert store.list("") == sorted(store.list("runs") + ["other/o.txt"])


def test_list_file_prefix_and_missing(store):
    store.write_text("runs/a/x.json", "1")
    assert store.list("runs/a/x.json") == ["runs/a/x.json"]
    assert store.list("/runs/a/x.json/") == ["runs/a/x.json"]
    assert store.list("runs/nope") == []
    assert store.list("nothing/at/all") == []


def test_list_skips_temp_files(store):
    store.write_text("runs/a/x.json", "1")
    # what a killed writer leaves behind: mkstemp's name pattern next to the target
    (store.root / "runs" / "a" / ".y.json.k3j4h5.tmp").write_text("partial")
    (store.root / "runs" / "a" / ".x.json.abcdef.tmp").write_text("partial")
    assert store.list("runs") == ["runs/a/x.json"]
    assert not store.exists("runs/a/y.json")


def test_list_does_not_show_in_progress_write(store):
    store.write_text("d/done.txt", "x")
    with store.open_writer("d/pending.txt") as f:
        f.write("...")
        assert store.list("d") == ["d/done.txt"]
    assert store.list("d") == ["d/done.txt", "d/pending.txt"]


def test_list_skips_files_inside_leftover_temp_dir(store):
    store.write_text("runs/a/model/config.json", "{}")
    crashed = store.root / "runs" / "a" / ".model.q1w2e3.tmp"
    crashed.mkdir()
    (crashed / "config.json").write_text("{}")
    assert store.list("runs/a") == ["runs/a/model/config.json"]


# --- key safety --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/../x", "runs/../../outside.json", ".."])
def test_keys_escaping_root_raise(store, key):
    for op in (
        lambda: store.write_bytes(key, b"x"),
        lambda: store.read_bytes(key),
        lambda: store.exists(key),
        lambda: store.create_only(key, b"x"),
        lambda: store.list(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(StoreError) as info:
            op()
        assert "escapes the store root" in str(info.value)
    assert not (store.root.parent / "x").exists()
    assert not (store.root.parent / "outside.json").exists()


def test_open_writer_escaping_root_raises(store):
    with pytest.raises(StoreError):
        with store.open_writer("../evil.txt") as f:
            f.write("x")
    assert not (store.root.parent / "evil.txt").exists()


def test_sibling_with_common_prefix_is_outside(tmp_path):
    s = LocalStore(tmp_path / "store")
    (tmp_path / "store-evil").mkdir()
    with pytest.raises(StoreError):
        s.write_text("../store-evil/x", "y")


def test_symlink_out_of_root_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError):
        store.write_text("link/x.txt", "y")
    assert not (outside / "x.txt").exists()


def test_leading_slash_stays_inside(store):
    store.write_text("/a/b.txt", "x")
    assert (store.root / "a" / "b.txt").read_text() == "x"
    assert store.read_text("a/b.txt") == "x"
    assert store.exists("a/./b.txt")


# --- trees -------------------------------------------------------------------------------------


def make_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "weights.bin").write_bytes(b"\x00\x01\x02")
    (root / "sub" / "deeper" / "tok.txt").write_text("tokens")
    return root


def test_put_dir_and_local_dir(store, tmp_path):
    src = make_tree(tmp_path / "model")
    store.put_dir(src, "runs/x/model")
    local = store.local_dir("runs/x/model")
    assert local == store.root / "runs" / "x" / "model"
    assert all_files(local) == all_files(src) == ["config.json", "sub/deeper/tok.txt", "sub/weights.bin"]
    assert (local / "sub" / "weights.bin").read_bytes() == b"\x00\x01\x02"
    assert store.list("runs/x/model") == [
        "runs/x/model/config.json", "runs/x/model/sub/deeper/tok.txt", "runs/x/model/sub/weights.bin",
    ]
    assert leftovers(store.root) == []
    assert all_files(src) == ["config.json", "sub/deeper/tok.txt", "sub/weights.bin"]  # source untouched


def test_put_dir_replaces_existing_tree(store, tmp_path):
    store.put_dir(make_tree(tmp_path / "v1"), "m")
    (store.root / "m" / "stale.txt").write_text("old")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "config.json").write_text('{"a": 2}')
    store.put_dir(v2, "m")
    assert all_files(store.local_dir("m")) == ["config.json"]
    assert store.read_json("m/config.json") == {"a": 2}
    assert leftovers(store.root) == []


def test_put_dir_onto_itself_is_noop(store, tmp_path):
    store.put_dir(make_tree(tmp_path / "model"), "m")
    store.put_dir(store.local_dir("m"), "m")
    assert all_files(store.local_dir("m")) == ["config.json", "sub/deeper/tok.txt", "sub/weights.bin"]


def test_put_dir_failure_keeps_old_tree(store, tmp_path, monkeypatch):
    store.put_dir(make_tree(tmp_path / "v1"), "m")

    calls = []

    def failing_copy(*a, **kw):  # the second file fails to copy: the tree must stay the old one
        calls.append(a)
        if len(calls) == 2:
            raise OSError("copy failed")
        return real_copy(*a, **kw)

    real_copy = shutil.copy2
    monkeypatch.setattr(shutil, "copy2", failing_copy)
    with pytest.raises(OSError):
        store.put_dir(tmp_path / "v1", "m")
    monkeypatch.undo()
    assert all_files(store.local_dir("m")) == ["config.json", "sub/deeper/tok.txt", "sub/weights.bin"]
    assert leftovers(store.root) == []


def test_local_dir_missing_or_file(store):
    with pytest.raises(StoreError):
        store.local_dir("no/such/dir")
    store.write_text("f.txt", "x")
    with pytest.raises(StoreError):
        store.local_dir("f.txt")


# --- URIs --------------------------------------------------------------------------------------


def test_split_uri(tmp_path):
    root = tmp_path / "store"
    s, key = split_uri(f"{root}/runs/x/round-1/generate/spec.json")
    assert isinstance(s, LocalStore)
    assert s.root == root.resolve()
    assert key == "runs/x/round-1/generate/spec.json"
    s.write_json(key, {"ok": True})
    assert (root / "runs" / "x" / "round-1" / "generate" / "spec.json").exists()


def test_split_uri_file_scheme(tmp_path):
    s, key = split_uri(f"file://{tmp_path}/runs/r/run.json")
    assert s.root == tmp_path.resolve() and key == "runs/r/run.json"


def test_split_uri_without_runs(tmp_path):
    with pytest.raises(StoreError) as info:
        split_uri(f"{tmp_path}/spec.json")
    assert "\n" not in str(info.value) and "runs/" in str(info.value)


def test_split_uri_s3():
    s, key = split_uri("s3://bucket/prefix/runs/x/round-1/generate/spec.json")  # no request until first use
    assert (s.uri, key) == ("s3://bucket/prefix", "runs/x/round-1/generate/spec.json")


def test_split_uri_store_path_containing_runs(tmp_path):
    root = tmp_path / "runs" / "cai-store"
    s, key = split_uri(f"{root}/runs/x/round-1/generate/spec.json")
    assert s.root == root.resolve()
    assert key == "runs/x/round-1/generate/spec.json"


def test_open_store(tmp_path):
    s = open_store(tmp_path / "a")
    assert isinstance(s, LocalStore) and s.root == (tmp_path / "a").resolve()
    s2 = open_store(f"file://{tmp_path}/b")
    assert isinstance(s2, LocalStore) and s2.root == (tmp_path / "b").resolve()


@pytest.mark.parametrize("uri, bucket, prefix", [("s3://bucket/a/b/", "bucket", "a/b"), ("s3://bucket", "bucket", "")])
def test_open_store_s3(uri, bucket, prefix):
    s = open_store(uri)  # the S3 store itself is tested against a real server in test_store_s3.py
    assert (type(s).__name__, s.bucket, s.prefix, s.uri) == ("S3Store", bucket, prefix, uri.rstrip("/"))
    with pytest.raises(ConfigError) as info:  # bad input: exit 2, not a store failure
        open_store("s3:///prefix")
    assert "no bucket name" in str(info.value) and info.value.exit_code == 2


# --- file modes --------------------------------------------------------------------------------


def test_file_modes_follow_umask(store, tmp_path):
    store.write_bytes("a.bin", b"x")
    store.write_json("b.json", {})
    store.write_jsonl("c.jsonl", [{"x": 1}])
    store.create_only("d.lock", b"x")
    with store.open_writer("e.txt") as f:
        f.write("x")
    expected = 0o666 & ~umask()
    for name in ["a.bin", "b.json", "c.jsonl", "d.lock", "e.txt"]:
        mode = stat.S_IMODE((store.root / name).stat().st_mode)
        assert mode == expected, f"{name}: {oct(mode)}"
        if umask() == 0o022:
            assert mode & 0o044, f"{name} is not group/world readable: {oct(mode)}"


def test_put_dir_tree_is_readable(store, tmp_path):
    src = make_tree(tmp_path / "model")
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    store.put_dir(src, "m")
    local = store.local_dir("m")
    for p in [local, *local.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044, f"{p} mode {oct(mode)}"  # mkdtemp's 0700 must not survive
