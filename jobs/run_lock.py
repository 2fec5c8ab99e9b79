"""A lease in the artifact store: one controller drives a run (and one realign tick the pointer) at a time.

The lock is a create-only object (`runs/<id>/lock.json`, `models/realign.lock`) naming its holder and
an expiry; a heartbeat thread pushes the expiry forward while the holder runs, and the holder deletes
it at the end, also when it crashes (context manager; SIGTERM becomes an interrupt so pods release
too). A second controller fails fast with the holder's name and the expiry, unless the holder has
stopped renewing: then it waits for the expiry and takes over (a restarted controller pod whose
predecessor was killed outright). Only create-only writes are
needed, so it works the same on a local directory (link) and on S3 (PUT If-None-Match: *).

Taking over an expired lock cannot be one atomic compare-and-swap with these primitives, so it is
fenced in steps, each narrowing the race:
  1. expired means `expires_at + grace` has passed by the taker's clock (grace absorbs clock skew);
  2. the taker first wins a create-only marker `<key>.takeover-<token of the expired lock>`: of many
     takers of one expired lock exactly one goes on, the others fail fast like any second controller;
  3. it re-reads the lock, and only if the same expired token is still there deletes it and creates
     its own, create-only again (a newcomer that slipped in between wins and the taker fails fast);
  4. the old holder never renews past its own expiry, and every heartbeat checks the token, so a
     holder that stalled past its expiry learns it lost the lock and `check()` raises LockLost.
What is left: a holder stalled (or skewed) by more than `grace` that wakes between the taker's
re-read and delete, or renews between the taker's checks. Then two controllers can overlap until the
next heartbeat; stage manifests are create-only and specs are content-addressed, so the work both
do is identical and only one copy of each stage's outputs is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from .errors import EX_TEMPFAIL, CaiError, NotFound
from .store import ArtifactStore

TTL_S = 40.0  # a holder killed without cleanup (SIGKILL, lost node) blocks the run for this plus the grace
HEARTBEAT_FRACTION = 0.25  # renew every 10 s: three heartbeats can be late before the lock lapses
GRACE_FRACTION = 0.25  # takeover waits 10 s past expiry: clocks of two pods may disagree by seconds
STALE_FRACTION = 0.5  # not renewed for 20 s (two missed heartbeats): the holder is most likely gone


class LockHeld(CaiError):
    """Another live controller holds the lock."""

    exit_code = EX_TEMPFAIL


class LockLost(CaiError):
    """This controller's lock expired or was taken over while it ran."""

    exit_code = EX_TEMPFAIL


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def owner_info() -> dict[str, Any]:
    """Who holds the lock: enough for a person to find the process (pod name on Kubernetes)."""
    host = socket.gethostname()
    return {"host": host, "pid": os.getpid(), "pod": os.environ.get("POD_NAME") or None}


def holder_is_dead_here(owner: dict[str, Any]) -> bool:
    """The holder ran on this host (not in a pod) and its process is gone."""
    if owner.get("pod") or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def describe_owner(owner: dict[str, Any]) -> str:
    where = f"pod {owner['pod']}" if owner.get("pod") else f"host {owner.get('host', '?')}"
    return f"{where} pid {owner.get('pid', '?')}"


class RunLock:
    """`with RunLock(store, key):` holds the lease for the block; `check()` raises if it was lost."""

    def __init__(self, store: ArtifactStore, key: str, ttl_s: float = TTL_S, purpose: str = "run",
                 clock=time.time, sleep=time.sleep):
        self.store, self.key, self.ttl_s, self.purpose = store, key, ttl_s, purpose
        self.clock, self.sleep = clock, sleep
        self.grace_s = ttl_s * GRACE_FRACTION
        self.token = uuid.uuid4().hex
        self.owner = owner_info()
        self.acquired_at: float | None = None
        self.expires_at = 0.0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_sigterm = None

    # --- the lock object ----------------------------------------------------------------------
    def _write(self, create: bool) -> bool:
        """Our record, create-only or replacing; the expiry counts from before the write, and is
        believed only once the write has landed."""
        now = self.clock()
        expires = now + self.ttl_s
        data = json.dumps({
            "token": self.token, "owner": self.owner, "purpose": self.purpose, "ttl_s": self.ttl_s,
            "acquired_at": _iso(self.acquired_at or now), "renewed_at": _iso(now),
            "expires_at": _iso(expires), "expires_at_epoch": expires, "renewed_at_epoch": now,
        }, indent=2, sort_keys=True).encode() + b"\n"
        if create:
            if not self.store.create_only(self.key, data):
                return False
        else:
            self.store.write_bytes(self.key, data)
        self.expires_at = expires
        return True

    def _read(self, key: str | None = None) -> dict[str, Any] | None:
        """The record, or None when it is not there. A transport error raises: it is no evidence either way."""
        try:
            data = self.store.read_bytes(key or self.key)
        except NotFound:
            return None  # gone between our create attempt and this read: try again
        try:
            return json.loads(data)
        except json.JSONDecodeError:  # not ours to interpret: treat as expired, under a token of its content
            return {"token": "unreadable-" + hashlib.sha256(data).hexdigest()[:16], "owner": {}, "expires_at_epoch": 0.0}

    def _held_error(self, rec: dict[str, Any], why: str = "") -> LockHeld:
        return LockHeld(
            f"{self.store.uri_for(self.key)}: {self.purpose} is locked by {describe_owner(rec.get('owner', {}))} "
            f"since {rec.get('acquired_at', '?')}, until {rec.get('expires_at', '?')} unless renewed{why}; "
            "wait for it to finish, or re-run after that time if it has died"
        )

    def acquire(self) -> None:
        """Fails fast while the holder renews; waits out a stale lock (a pod restarted after its
        predecessor was killed finds its lock) and takes over an expired one."""
        for _ in range(5):  # a lock that vanishes between our create and read: retry a few times
            self.acquired_at = self.clock()
            if self._write(create=True):
                return
            rec = self._read()
            if rec is None:
                continue
            now, takeover_at = self.clock(), float(rec.get("expires_at_epoch", 0.0)) + self.grace_s
            if now < takeover_at and holder_is_dead_here(rec.get("owner", {})):
                takeover_at = now  # killed on this very host (Ctrl-C, SIGKILL): no need to wait out its lease
            if now < takeover_at:
                if now - float(rec.get("renewed_at_epoch", now)) < self.ttl_s * STALE_FRACTION:
                    raise self._held_error(rec)
                print(f"[cai] {self.store.uri_for(self.key)}: {describe_owner(rec.get('owner', {}))} stopped renewing its lock; "
                      f"taking it over in {takeover_at - now:.0f}s", file=sys.stderr, flush=True)
                self.sleep(takeover_at - now)
                continue  # look again: a holder that came back has renewed, and then we fail fast
            self._take_over(rec)
            return
        raise LockHeld(f"{self.store.uri_for(self.key)}: {self.purpose} lock keeps changing hands; retry later")

    def _take_over(self, expired: dict[str, Any]) -> None:
        marker = f"{self.key}.takeover-{expired.get('token', 'unknown')}"
        if not self._claim(marker):
            raise self._held_error(expired, " (expired; another controller is taking it over)")
        try:
            current = self._read()
            if current is not None and current.get("token") != expired.get("token"):
                raise self._held_error(current)
            self.store.delete(self.key)
            self.acquired_at = self.clock()
            if not self._write(create=True):
                raise self._held_error(self._read() or expired)
        finally:
            # the marker has done its job (one taker of this lock): left behind, it would block the next
            # takeover of a lock with the same token, which unreadable locks share (an empty file twice)
            self.store.delete(marker)

    def _claim(self, marker: str) -> bool:
        """Win the takeover marker; one left by a taker that died mid-takeover counts once it is a lease old."""
        now = self.clock()
        body = json.dumps({"by": self.owner, "at": _iso(now), "at_epoch": now, "token": self.token}).encode()
        if self.store.create_only(marker, body):
            return True
        try:
            left = json.loads(self.store.read_bytes(marker))
        except NotFound:
            return self.store.create_only(marker, body)
        except json.JSONDecodeError:
            left = {}
        if float(left.get("at_epoch", 0.0)) + self.ttl_s + self.grace_s > now:
            return False
        self.store.delete(marker)
        return self.store.create_only(marker, body)

    def renew(self) -> None:
        """Push the expiry forward, unless the lock is no longer ours (then mark it lost)."""
        if self.clock() >= self.expires_at:  # never renew a lock that may already have been taken
            self.lost.set()
            return
        rec = self._read()
        if rec is None or rec.get("token") != self.token:
            self.lost.set()
            return
        self._write(create=False)

    def release(self) -> None:
        rec = self._read()
        if rec is not None and rec.get("token") == self.token:
            self.store.delete(self.key)

    def check(self) -> None:
        """Raise if the lock was taken over or, by our own clock, has lapsed (whatever the heartbeat did)."""
        if self.lost.is_set() or self.clock() >= self.expires_at:
            self.lost.set()
            raise LockLost(
                f"{self.store.uri_for(self.key)}: this controller's {self.purpose} lock expired or was taken over "
                f"(heartbeat missed for {self.ttl_s:g}s); another controller may be driving it, so this one stops"
            )

    # --- heartbeat and context manager --------------------------------------------------------
    def _beat(self) -> None:
        """Renew every interval; after a failed renewal retry sooner (1, 2, 4 s ...), within the lease.
        A failed call is no evidence the lock is lost: only another token in it, or our own clock
        passing the expiry without a renewal landing, is (`check()` fences the lapse)."""
        interval = self.ttl_s * HEARTBEAT_FRACTION
        wait, failures = interval, 0
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait, failures = interval, 0
            except Exception as e:  # noqa: BLE001 - a store hiccup
                failures += 1
                wait = min(interval, 2.0 ** (failures - 1))
                print(f"[cai] {self.store.uri_for(self.key)}: lock renewal failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                      f"retrying in {wait:.0f}s, {max(self.expires_at - self.clock(), 0):.0f}s of the lease left", file=sys.stderr, flush=True)
            if self.lost.is_set():
                return

    def __enter__(self) -> "RunLock":
        self.store.check_conditional_writes()  # the lock is only as good as the store's create-only writes
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat:{self.key}", daemon=True)
        self._thread.start()
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        try:
            self.release()
        except CaiError:
            pass  # the store is unreachable: the lock lapses after its TTL, and the real error stays visible


def _sigterm_to_interrupt(signum, frame) -> None:
    """Kubernetes stops a pod with SIGTERM; as an interrupt it unwinds `with RunLock` (releasing the
    lock), the run is recorded as interrupted and a re-run resumes, as after Ctrl-C."""
    raise KeyboardInterrupt("SIGTERM")
