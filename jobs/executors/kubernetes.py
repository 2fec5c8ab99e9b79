"""Run stages as Kubernetes Jobs through an injected client: create or adopt, wait, copy logs, explain.

`KubernetesExecutor.run(stage, spec_uri)` has the local executor's interface. The Job comes from
`k8s_manifests.build_job`; its name is derived from the spec, so a restarted controller finds the
Job it submitted before and watches it instead of starting the work twice. Pod logs are copied into
the store (`<output>/logs/<pod>.log`) as each pod finishes, before `ttlSecondsAfterFinished` can
delete them, and a failed Job becomes one StageFailed line that says why and what to change.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import KubernetesConfig, StageSpec
from ..errors import ApiUnavailable, CaiError, ConfigError, StageFailed, StoreError, SubmitError, reported_line
from ..schema import parse_data
from ..store import ArtifactStore
from ..manifest import inputs_digest
from .k8s_manifests import CONTAINER, INPUTS_HASH, JOB_LABEL, SPEC_HASH, build_job, build_rendezvous_service
from .local import EXIT_CONFIG

IMAGE_ERRORS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
START_ERRORS = {"CreateContainerConfigError", "CreateContainerError"}  # e.g. a missing Secret
TRANSIENT_TRIES = 5  # consecutive failed polls (API server restart, network blip) before exiting 75 (retried)
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def log(msg: str) -> None:
    print(f"[cai] {msg}", file=sys.stderr, flush=True)


def api_error(what: str, e: Exception) -> SubmitError:
    """One line from an ApiException or a connection error, with the fix where it is known."""
    status = getattr(e, "status", None)
    if status is None:
        reason = getattr(e, "reason", None) or e
        return ApiUnavailable(f"{what}: cannot reach the Kubernetes API ({str(reason).splitlines()[0]}); check KUBECONFIG / the cluster")
    body = str(getattr(e, "body", "") or "")
    message = body
    try:
        import json

        message = json.loads(body).get("message", body)
    except (ValueError, AttributeError):
        pass
    hint = "; the controller's ServiceAccount needs the Role that `cai render --controller` prints" if status == 403 else ""
    if status >= 500 or status == 429:  # the API server restarting or shedding load: worth a retry of the pod
        return ApiUnavailable(f"{what}: {status} {getattr(e, 'reason', '')}: the Kubernetes API is unavailable; the controller "
                              "exits 75 and its Job retries it, adopting the stage Jobs already running")
    return SubmitError(f"{what}: {status} {getattr(e, 'reason', '')}: {' '.join(str(message).split())[:300]}{hint}")


def kube_clients(namespace: str | None = None) -> tuple[Any, Any, str]:
    """(BatchV1Api, CoreV1Api, namespace) from the pod's ServiceAccount, else from KUBECONFIG."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise SubmitError("the Kubernetes executor needs the kubernetes client: pip install 'cai-jobs[k8s]'") from None
    conf = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=conf)
        ns = SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.exists() else "default"
    except config.ConfigException:
        try:
            # read KUBECONFIG now: the client's default path was fixed when it was first imported
            path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            config.load_kube_config(config_file=path, client_configuration=conf)
            _, active = config.list_kube_config_contexts(config_file=path)
            ns = (active or {}).get("context", {}).get("namespace") or "default"
        except (config.ConfigException, OSError) as e:
            raise SubmitError(f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({e}); set KUBECONFIG") from None
        except Exception as e:  # noqa: BLE001 - the client parses the file with PyYAML and lets its errors through
            first = " ".join(str(e).split())[:200]
            raise ConfigError(f"kubeconfig {path}: cannot be read ({type(e).__name__}: {first}); fix the file or point KUBECONFIG "
                              "at a valid one") from None
    api = client.ApiClient(conf)
    return client.BatchV1Api(api), client.CoreV1Api(api), namespace or ns


# --- reading Job and pod status (pure) ------------------------------------------------------------
def job_state(job: Any) -> tuple[str | None, str, str]:
    """("complete" | "failed" | None, reason, message) from the Job's conditions."""
    for c in (job.status and job.status.conditions) or []:
        if c.status == "True" and c.type in ("Complete", "Failed"):
            return ("complete" if c.type == "Complete" else "failed"), c.reason or "", c.message or ""
    return None, "", ""


def _containers(pod: Any) -> list[Any]:
    return [s for s in (pod.status and pod.status.container_statuses) or [] if s.name == CONTAINER]


def pod_blocker(pod: Any) -> str | None:
    """Why a pod can never start (bad image, missing Secret), or None: these fail fast."""
    for s in _containers(pod):
        waiting = s.state and s.state.waiting
        if waiting and waiting.reason in IMAGE_ERRORS:
            return f"cannot pull image {s.image} ({waiting.reason}); check kubernetes.image_repository/image_tag, the stage's image and image_pull_secrets"
        if waiting and waiting.reason in START_ERRORS:
            return f"pod {pod.metadata.name} cannot start ({waiting.reason}: {' '.join((waiting.message or '').split())})"
    return None


def termination(pod: Any) -> tuple[str, int | None]:
    """(reason, exit code) of the stage container's last run, e.g. ("OOMKilled", 137)."""
    for s in _containers(pod):
        for st in (s.state, s.last_state):
            t = st and st.terminated
            if t:
                return t.reason or "", t.exit_code
    return "", None


def first_cause(failed: list[Any]) -> Any:
    """The pod of a gang that failed on its own, not one stopped after it (killed by a signal, 128+N, when
    the Job controller removed the gang): the first to finish among those."""
    def finished(pod: Any) -> Any:
        for s in _containers(pod):
            t = s.state and s.state.terminated
            if t and t.finished_at:
                return t.finished_at
        return None

    own = [p for p in failed if not 128 < (termination(p)[1] or 0) < 160] or failed
    timed = [p for p in own if finished(p) is not None]
    return min(timed, key=finished) if timed else own[0]


def pod_summary(pod: Any) -> str:
    phase = (pod.status and pod.status.phase) or "Pending"
    reason, code = termination(pod)
    detail = f"{reason}, exit {code}" if code is not None else ""
    for s in _containers(pod):
        if s.state and s.state.waiting and s.state.waiting.reason:
            detail = s.state.waiting.reason
    for c in (pod.status and pod.status.conditions) or []:
        if c.type == "PodScheduled" and c.status == "False" and c.reason:
            detail = f"{c.reason}: {' '.join((c.message or '').split())[:160]}"
    return f"{pod.metadata.name} {phase}" + (f" ({detail})" if detail else "")


def failure_message(spec: StageSpec, job: Any, pods: list[Any], logs: dict[str, str], k8s: KubernetesConfig) -> str:
    """One line: which Job, the Kubernetes reason, and what to change."""
    _, reason, message = job_state(job)
    res, where = k8s.stages[spec.stage], f"kubernetes.stages.{spec.stage}"
    failed = [p for p in pods if termination(p)[1] not in (None, 0)]
    last = (first_cause(failed) if res.nodes > 1 else failed[-1]) if failed else None
    tail = f": {reported_line(logs.get(last.metadata.name, '').splitlines())}" if last is not None else ""
    if any(termination(p)[0] == "OOMKilled" for p in pods):
        why = f"OOMKilled at the memory limit {res.memory}; raise {where}.memory"
    elif reason == "DeadlineExceeded":
        why = f"ran longer than activeDeadlineSeconds={res.active_deadline_seconds}; raise {where}.active_deadline_seconds"
    elif reason == "PodFailurePolicy" and last is not None and termination(last)[1] == EXIT_CONFIG:
        why = f"config error (exit {EXIT_CONFIG}, not retried){tail}"
    elif reason == "BackoffLimitExceeded":
        code = termination(last)[1] if last is not None else None
        why = f"{len(failed)} pod failure(s), backoffLimit {k8s.backoff_limit}; last exit {code}{tail}"
    else:
        why = f"{' '.join(message.split()) or 'failed'}{tail}"
    return f"stage {spec.stage} failed: job {job.metadata.namespace}/{job.metadata.name}: {reason or 'Failed'}: {why}"


def progress_line(job: Any, pods: list[Any]) -> str:
    st = job.status
    counts = f"{(st and st.active) or 0} active, {(st and st.succeeded) or 0} succeeded, {(st and st.failed) or 0} failed"
    suspended = " (suspended: waiting for Kueue admission)" if job.spec and job.spec.suspend else ""
    return f"job {job.metadata.name}: {counts}{suspended}" + "".join(f"; {pod_summary(p)}" for p in pods[-4:])


@dataclass
class Outcome:
    state: str  # complete | failed | gone
    job: Any = None
    pods: list[Any] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)


# --- the executor ---------------------------------------------------------------------------------
class KubernetesExecutor:
    """Runs each StageSpec as a batch/v1 Job; the client objects are injected (tests hand in ones
    that talk to an emulated API server)."""

    def __init__(self, batch_api: Any, core_api: Any, store: ArtifactStore, k8s_config: KubernetesConfig,
                 namespace: str | None = None, sleep: Callable[[float], None] = time.sleep):
        self.batch, self.core, self.store, self.k8s = batch_api, core_api, store, k8s_config
        self.namespace = namespace or k8s_config.namespace or "default"
        self.sleep = sleep
        self.cancel_check: Callable[[], dict | None] | None = None  # the run's cancel request (set by the controller)
        if k8s_config.ttl_seconds_after_finished < 3 * k8s_config.poll_seconds:
            log(f"warning: kubernetes.ttl_seconds_after_finished={k8s_config.ttl_seconds_after_finished} is under 3 polls "
                f"({k8s_config.poll_seconds:g}s each): a finished Job may be deleted before its last pod's log is copied")

    @classmethod
    def from_environment(cls, store: ArtifactStore, k8s_config: KubernetesConfig) -> KubernetesExecutor:
        batch, core, ns = kube_clients(k8s_config.namespace)
        return cls(batch, core, store, k8s_config, namespace=ns)

    def run(self, stage: str, spec_uri: str) -> str:
        spec = self._load_spec(spec_uri)
        job = build_job(spec, spec_uri, self.k8s, namespace=self.namespace, inputs_hash=inputs_digest(self.store, spec))
        gang = job.spec.template.spec.subdomain is not None  # a multi-node Job: its pods meet at pod 0 (or their group's first)
        if gang:
            self._create_service(build_rendezvous_service(job))
        self.submit(job, spec)
        try:
            outcome = self.wait(job.metadata.name, spec)
        except KeyboardInterrupt:
            log(f"job {self.namespace}/{job.metadata.name} left running; re-run to watch it again")
            raise
        except CaiError:  # failed or cancelled: its pods are gone, so is their rendezvous
            if gang:
                self._delete_service(job.metadata.name)
            raise
        if gang:
            self._delete_service(job.metadata.name)
        if outcome.state == "failed" and gang and self._outputs_complete(spec):
            # each pod decides on its own whether the stage is already done: when another attempt finished it
            # in between, rank 0 skips while its peers wait for it and fail, but the outputs stand
            log(f"job {self.namespace}/{job.metadata.name}: failed, but the stage's outputs are complete (another attempt); done")
        elif outcome.state == "failed":
            raise StageFailed(failure_message(spec, outcome.job, outcome.pods, outcome.logs, self.k8s))
        if outcome.state == "gone" and not self._outputs_complete(spec):
            raise StageFailed(f"stage {stage} failed: job {self.namespace}/{job.metadata.name} was deleted before it finished; re-run to submit it again")
        return ""  # pod logs are in the store already, one file per pod

    # --- plan-time checks --------------------------------------------------------------------------
    def check_fits(self, config: Any, model_config: dict[str, Any]) -> None:
        """Each stage's estimated GPU memory against its pods' GPUs (where kubernetes.stages.*.gpu_memory_gib is set)."""
        from ..distributed import memory_layout, sharded
        from ..memory import check_fits, dtype_bytes, needed_gib, parameter_count

        try:
            params = parameter_count(model_config)
        except (KeyError, TypeError, ValueError):
            return  # not a decoder-only transformer config we can count: no estimate, no check
        weight = dtype_bytes(config.engine.dtype, model_config)
        train = config.train
        reference = train.method in ("sft+dpo", "dpo") and not train.dpo.precompute_ref_log_probs
        layout = train.distributed
        full, offload = memory_layout(layout)
        layers = int(model_config.get("num_hidden_layers") or 1)
        embeddings = (int(model_config.get("vocab_size") or 0) * int(model_config.get("hidden_size") or 0)
                      * (1 if model_config.get("tie_word_embeddings") else 2))
        for stage in config.stages:
            res = self.k8s.stages[stage]
            shards = layout.processes * res.nodes if stage == "train" and sharded(layout) else 1
            need, how = needed_gib(stage, params, weight, lora=train.lora.enabled, dpo_reference=reference, shards=shards,
                                   full_shard=full, offload=offload, layers=layers, embeddings=embeddings)
            check_fits(stage, need, how, res.gpus, res.gpu_memory_gib, nodes=res.nodes)

    # --- submit / adopt ---------------------------------------------------------------------------
    def submit(self, job: Any, spec: StageSpec) -> None:
        from kubernetes.client.exceptions import ApiException

        name, what = job.metadata.name, f"job {self.namespace}/{job.metadata.name}"
        try:
            self.batch.create_namespaced_job(self.namespace, job)
            log(f"{what}: created ({job.spec.completions} pod(s), image {job.spec.template.spec.containers[0].image})")
            return
        except ApiException as e:
            if e.status != 409:
                raise api_error(f"create {what}", e) from None
        except Exception as e:  # urllib3 connection errors
            raise api_error(f"create {what}", e) from None
        existing = self._read(name)
        annotations = (existing and existing.metadata.annotations) or {}
        theirs = annotations.get(SPEC_HASH)
        if existing is not None and theirs != spec.spec_hash():
            raise SubmitError(f"{what} exists with spec hash {theirs}, not {spec.spec_hash()}; delete it (kubectl delete job -n {self.namespace} {name}) or use another --run-id")
        state = job_state(existing)[0] if existing is not None else "gone"
        if existing is not None and annotations.get(INPUTS_HASH) != job.metadata.annotations[INPUTS_HASH]:
            # same spec, other input bytes (a prompt file edited, a model replaced): its work does not count
            why = f"an earlier Job ran this spec on other inputs ({state or 'running'}); replacing it"
        elif state == "complete" and not self._outputs_complete(spec):  # its outputs were deleted since: run it again
            why = "finished earlier, but its outputs are gone from the store; replacing it"
        elif state in ("failed", "gone"):
            why = f"a previous attempt {'failed' if state == 'failed' else 'vanished'}; submitting it again"
        else:
            why = None
        if why:
            log(f"{what}: {why}")
            self._delete(name)
            self._call(f"create {what}", self.batch.create_namespaced_job, self.namespace, job)
        else:
            log(f"{what}: already {'finished' if state else 'running'} (submitted by an earlier controller); watching it")

    def _create_service(self, service: Any) -> None:
        """The rendezvous Service, before the Job's pods look their peers up; one left by an earlier controller is reused."""
        from kubernetes.client.exceptions import ApiException

        what = f"service {self.namespace}/{service.metadata.name}"
        try:
            self.core.create_namespaced_service(self.namespace, service)
            log(f"{what}: created (headless, the rendezvous of {service.metadata.name}'s pods)")
        except ApiException as e:
            if e.status != 409:
                raise api_error(f"create {what}", e) from None
        except Exception as e:
            raise api_error(f"create {what}", e) from None

    def _delete_service(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_service(name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                log(f"service {self.namespace}/{name}: not deleted ({e.status}); delete it by hand (kubectl delete service -n {self.namespace} {name})")
        except Exception:  # noqa: BLE001 - a leftover Service is harmless: the next run reuses it
            log(f"service {self.namespace}/{name}: not deleted (API unreachable); the next run reuses it")

    def _delete(self, name: str) -> None:
        """Delete a Job and its pods, and wait until it is gone, so its name can be reused."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Foreground")
        except ApiException as e:
            if e.status != 404:
                raise api_error(f"delete job {self.namespace}/{name}", e) from None
        deadline = time.monotonic() + max(60.0, 6 * self.k8s.poll_seconds)
        while self._read(name) is not None:
            if time.monotonic() > deadline:
                raise SubmitError(f"job {self.namespace}/{name}: still being deleted after a minute; delete it by hand and re-run")
            self.sleep(min(self.k8s.poll_seconds, 2.0))

    # --- wait -------------------------------------------------------------------------------------
    def wait(self, name: str, spec: StageSpec) -> Outcome:
        """Poll until the Job completes or fails; copy each pod's log as soon as the pod finishes."""
        logs: dict[str, str] = {}
        shown, errors = "", 0
        blocked_since: dict[str, float] = {}  # blocker -> when first seen: pulls get a grace period
        while True:
            try:
                job = self._read(name, strict=True)
                pods = self._pods(name, job) if job is not None else []
                errors = 0
            except SubmitError:
                errors += 1
                if errors >= TRANSIENT_TRIES:
                    raise
                self.sleep(self.k8s.poll_seconds)
                continue
            request = self._cancel_requested()
            if request is not None:
                if job is not None:
                    self._delete(name)
                from ..runs import RunCancelled

                raise RunCancelled(f"stage {spec.stage} stopped: the run was cancelled ({request.get('reason', '')}); "
                                   f"job {self.namespace}/{name} deleted")
            if job is None:
                return Outcome("gone", logs=logs)
            state = job_state(job)[0]
            self._copy_logs(spec, pods, logs, everything=state is not None)
            if state is not None:
                return Outcome(state, job, pods, logs)
            blocker = next((b for b in map(pod_blocker, pods) if b), None)
            if blocker:
                first = blocked_since.setdefault(blocker, time.monotonic())
                if not blocker.startswith("cannot pull") or time.monotonic() - first >= self.k8s.image_pull_grace_s:
                    self._delete(name)  # it would retry until the deadline; nothing to wait for
                    grace = f" for {self.k8s.image_pull_grace_s:g}s (kubernetes.image_pull_grace_s)" if blocker.startswith("cannot pull") else ""
                    raise StageFailed(f"stage {spec.stage} failed: job {self.namespace}/{name}: {blocker}{grace} (job deleted)")
            else:
                blocked_since.clear()
            line = progress_line(job, pods)
            if line != shown:
                log(line)
                shown = line
            self.sleep(self.k8s.poll_seconds)

    def _cancel_requested(self) -> dict | None:
        if self.cancel_check is None:
            return None
        try:
            return self.cancel_check()
        except Exception:  # noqa: BLE001 - a store hiccup is no request; the next poll looks again
            return None

    def _copy_logs(self, spec: StageSpec, pods: list[Any], logs: dict[str, str], everything: bool) -> None:
        from kubernetes.client.exceptions import ApiException

        for pod in pods:
            name = pod.metadata.name
            finished = pod.status and pod.status.phase in ("Succeeded", "Failed")
            if name in logs or not (finished or everything):
                continue
            try:
                resp = self.core.read_namespaced_pod_log(name, self.namespace, container=CONTAINER, _preload_content=False)
                text = resp.data.decode("utf-8", "replace")  # raw: the client would json-parse a log that looks like JSON
            except ApiException as e:
                if not finished:
                    continue  # never started (e.g. killed while pending): nothing to keep
                text = f"[cai] log of pod {name} unavailable: {e.status} {e.reason}\n"
            logs[name] = text  # the outcome carries it whether or not the store copy lands
            try:
                self.store.write_text(pod_log_key(spec.output, name), text)
            except StoreError as e:  # a copy of a log is not worth failing the stage for
                log(f"pod {name}: could not copy its log to the store ({str(e).splitlines()[0]}); it is shown below instead")

    # --- API helpers --------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # ApiException or urllib3's connection errors
            raise api_error(what, e) from None

    def _read(self, name: str, strict: bool = False) -> Any:
        """The Job, or None once it is gone; other errors raise SubmitError. A GET of the Job itself
        (not its /status subresource) returns .status too and needs only `get` on jobs (tests/test_rbac.py)."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.batch.read_namespaced_job(name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(f"read job {self.namespace}/{name}", e) from None
        except Exception as e:
            raise api_error(f"read job {self.namespace}/{name}", e) from None

    def _pods(self, name: str, job: Any) -> list[Any]:
        pods = self._call(f"list pods of job {self.namespace}/{name}", self.core.list_namespaced_pod, self.namespace,
                          label_selector=f"{JOB_LABEL}={name}").items
        uid = job.metadata.uid
        # pods of an earlier Job of the same name may still be terminating: keep this Job's own
        mine = [p for p in pods if not uid or not p.metadata.owner_references or any(o.uid == uid for o in p.metadata.owner_references)]
        return sorted(mine, key=lambda p: (str(p.metadata.creation_timestamp or ""), p.metadata.name))

    def _load_spec(self, spec_uri: str) -> StageSpec:
        prefix = self.store.uri.rstrip("/") + "/"
        if spec_uri.startswith(prefix):
            return parse_data(StageSpec, self.store.read_json(spec_uri[len(prefix):]), spec_uri)
        from ..stages import load_spec

        return load_spec(spec_uri)[0]

    def _outputs_complete(self, spec: StageSpec) -> bool:
        """A Job deleted after finishing (TTL) still counts if every manifest it had to write is there."""
        from ..manifest import is_complete
        from ..sharding import shard_count
        from ..stages import shard_spec

        count = shard_count(spec.params)
        parts = [spec] if count == 1 else [shard_spec(spec, i, count) for i in range(count)]
        return is_complete(self.store, spec) or all(is_complete(self.store, p) for p in parts)


def pod_log_key(output: str, pod: str) -> str:
    return f"{output}/logs/{pod}.log"
