"""Pure builders for a run's Kubernetes objects: stage Jobs, the controller Job, its ConfigMap, RBAC.

Nothing here talks to a cluster. Each builder returns official `kubernetes` client models and
`to_yaml` renders them offline, so `cai render` prints exactly what `cai run --executor kubernetes`
and `cai submit` create. A stage Job runs the same command and stage env as the local executor
(`stage_command`, `pod_env` in local.py); only cluster plumbing (cache volume, S3 credentials) is added.
Stage pods stay offline (HF_HUB_OFFLINE=1); only the controller Job gets the Hub's endpoint and token.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml
from kubernetes.client import ApiClient
from kubernetes.client import models as m
from pydantic import ValidationError

from ..config import KubernetesConfig, StageResources, StageSpec, canonical_hash
from ..errors import ConfigError
from ..distributed import GROUP, LEADER, launch_layout, launcher, train_strategy
from ..sharding import shard_count
from .local import EXIT_CONFIG, pod_env, stage_command

CONTAINER = "stage"  # podFailurePolicy's exit-code rule and log reads name this container
RUN_AS_USER = 10001  # the `cai` user of the images (Dockerfile: useradd --uid 10001)
CACHE_DIR = "/var/cache/cai"  # emptyDir: model and store downloads live and die with the pod
CONFIG_DIR = "/etc/cai"  # the controller's ConfigMap (run.yaml, constitution.yaml)
HF_HOME = f"{CACHE_DIR}/hf"  # the controller's Hub downloads, in its cache emptyDir
HUB_OFFLINE = "HF_HUB_OFFLINE"  # in every stage pod's env (pod_env); never in the controller's
HF_TOKEN_KEY = "HF_TOKEN"  # the key in kubernetes.hf_token_secret
HF_TOKEN_DIR = "/var/run/secrets/cai/hf"  # where the controller pod mounts it, read-only
RDZV_PORT = 29500  # torchrun's c10d rendezvous on pod 0 of a multi-node Job
SPEC_HASH = "cai-jobs/spec-hash"
INPUTS_HASH = "cai-jobs/inputs-hash"  # the spec and its inputs' content digests: a Job is adopted only with both equal
SPEC_URI = "cai-jobs/spec-uri"
JOB_LABEL = "cai-jobs/job"  # on every pod of a Job: how the executor finds a Job's pods
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PART_OF = "cai-jobs"
# The controller only sequences stages and streams JSONL merges: small and steady. Its CPU limit leaves
# room for hashing a Hub model on its way into the store.
CONTROLLER_CPU, CONTROLLER_CPU_LIMIT, CONTROLLER_MEMORY = "500m", "2", "2Gi"
# CaiError exit codes (1: a stage failed, 2: bad input): rerunning the controller pod would fail the
# same way. Infrastructure kills (OOM 137, SIGTERM 143) and 75 (the store or the API briefly
# unavailable, a lock still held) are retried; the new pod adopts the stage Jobs already running.
CONTROLLER_FATAL_EXITS = [1, EXIT_CONFIG]
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def dns_label(text: str, identity: str | None = None, max_len: int = 63) -> str:
    """A DNS-1123 label (lowercase alphanumerics and '-', alphanumeric at both ends, <= 63 chars).
    With `identity`, a hash of it is appended so that names cut to fit stay unique."""
    base = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "cai"
    if identity is None:
        return base[:max_len].rstrip("-")
    suffix = short_hash(identity)
    return f"{base[: max_len - len(suffix) - 1].rstrip('-')}-{suffix}"


def label_value(text: str) -> str:
    """A valid label value: invalid characters become '-', and a value cut to 63 chars gets a hash."""
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", text).strip("-_.")
    if len(value) > 63:
        value = f"{value[:54].rstrip('-_.')}-{short_hash(text)}"
    assert _LABEL_VALUE.match(value), value
    return value


def common_labels(run_id: str, component: str, k8s: KubernetesConfig) -> dict[str, str]:
    return {
        **k8s.labels,
        "app.kubernetes.io/name": "cai-jobs",
        "app.kubernetes.io/instance": label_value(run_id),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "cai-jobs",
        "app.kubernetes.io/part-of": PART_OF,
        "cai-jobs/run": label_value(run_id),
    }


def stage_labels(spec: StageSpec, k8s: KubernetesConfig) -> dict[str, str]:
    labels = {**common_labels(spec.run_id, spec.stage, k8s), "cai-jobs/round": str(spec.round), "cai-jobs/stage": spec.stage}
    if k8s.queue:
        labels[QUEUE_LABEL] = label_value(k8s.queue)
    return labels


def stage_image(stage: str, k8s: KubernetesConfig) -> str:
    return k8s.stages[stage].image or f"{k8s.image_repository}-{stage}:{k8s.image_tag}"


def controller_image(k8s: KubernetesConfig) -> str:
    return f"{k8s.image_repository}:{k8s.image_tag}"


def job_name(spec: StageSpec, spec_uri: str) -> str:
    """`cai-<run>-r<k>-<stage>-<hash>`: readable, <= 63 chars, and a different spec (or store, or
    shard count) gets a different name, so a resubmitted spec never collides with a stale Job. Settings
    that only change speed (batch size, decode loop) keep the name: a restarted controller adopts the
    running Job instead of starting a second one that writes the same outputs."""
    where = "base" if spec.round == 0 else f"r{spec.round}"
    identity = canonical_hash({"spec_uri": spec_uri, "spec": spec.spec_hash(), "shards": shard_count(spec.params)})
    return dns_label(f"{_prefixed(spec.run_id)}-{where}-{spec.stage}", identity)


def _prefixed(run_id: str) -> str:
    return run_id if run_id.startswith("cai") else f"cai-{run_id}"


def _k8s_model(cls: type, data: Any, field: str) -> Any:
    """A user-supplied PodSpec fragment (tolerations, affinity) as its client model, or a one-line error."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"config: {field}{'.' + where if where else ''}: {err['msg']}; write it as in a Kubernetes PodSpec (camelCase keys)") from None


def _security(k8s: KubernetesConfig) -> tuple[m.V1PodSecurityContext, m.V1SecurityContext]:
    """The pod's securityContext (the config's, or non-root UID 10001) and the container's. The container
    never sets a UID, so the pod's applies, or the platform's where a policy assigns one (OpenShift)."""
    seccomp = m.V1SeccompProfile(type="RuntimeDefault")
    if k8s.pod_security_context is not None:
        pod = _k8s_model(m.V1PodSecurityContext, k8s.pod_security_context, "kubernetes.pod_security_context")
    else:
        pod = m.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, fs_group=RUN_AS_USER, seccomp_profile=seccomp
        )
    container = m.V1SecurityContext(
        run_as_non_root=True, allow_privilege_escalation=False, privileged=False,
        read_only_root_filesystem=True,  # writes go to the store, the cache emptyDir and /tmp only
        capabilities=m.V1Capabilities(drop=["ALL"]), seccomp_profile=seccomp,
    )
    return pod, container


def checkov_skips(image: str, k8s: KubernetesConfig, *, cpu_limit: bool, api_token: bool) -> dict[str, str]:
    """checkov's skip annotations where the product is right, each with its reason (tests/test_checkov.py
    runs checkov over `cai render --controller` and the chart; the chart's cai.checkovSkips says the same)."""
    reasons = []
    if api_token:
        reasons.append("CKV_K8S_38=the controller calls the Kubernetes API (create, get and delete stage Jobs), so it mounts its token")
    if not cpu_limit:
        reasons.append("CKV_K8S_11=no CPU limit on purpose: throttling a tokenizer or data loader only leaves the GPU idle")
    if "@sha256:" not in image:
        reasons.append("CKV_K8S_43=pinned by tag (the package version by default); give the image as repository@sha256:... to pin by digest")
    if k8s.image_pull_policy != "Always":
        reasons.append(f"CKV_K8S_15={k8s.image_pull_policy}: release tags are immutable and images are large; "
                       "set kubernetes.image_pull_policy to Always if you retag")
    return {f"checkov.io/skip{i}": r for i, r in enumerate(reasons, 1)}


def _store_env(k8s: KubernetesConfig) -> list[m.V1EnvVar]:
    """Where the store is and how to sign in: a Secret's keys, or nothing (IRSA / instance role)."""
    # HOME on the writable /tmp: with a read-only root filesystem, libraries that write under ~ (datasets,
    # matplotlib, torch's kernel caches) still find a place
    env = [m.V1EnvVar(name="CAI_CACHE_DIR", value=CACHE_DIR), m.V1EnvVar(name="HOME", value="/tmp")]
    if k8s.s3_endpoint:
        env.append(m.V1EnvVar(name="AWS_ENDPOINT_URL_S3", value=k8s.s3_endpoint))
    if k8s.s3_secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = m.V1SecretKeySelector(name=k8s.s3_secret, key=key)
            env.append(m.V1EnvVar(name=key, value_from=m.V1EnvVarSource(secret_key_ref=ref)))
    return env


def _hub_env(k8s: KubernetesConfig) -> list[m.V1EnvVar]:
    """The controller's way to the Hub: it downloads models and datasets and imports them into the
    store, so stage pods stay offline and never see the token."""
    env = [m.V1EnvVar(name="HF_HOME", value=HF_HOME)]
    if k8s.hf_endpoint:
        env.append(m.V1EnvVar(name="HF_ENDPOINT", value=k8s.hf_endpoint))
    if k8s.hf_token_secret:  # a mounted file, not an env var: no process listing or crash dump shows it
        env.append(m.V1EnvVar(name="HF_TOKEN_PATH", value=f"{HF_TOKEN_DIR}/token"))
    return env


def _hub_token_volume(k8s: KubernetesConfig) -> tuple[list[m.V1Volume], list[m.V1VolumeMount]]:
    """The HF token Secret as a read-only file (huggingface_hub reads HF_TOKEN_PATH), controller only."""
    if not k8s.hf_token_secret:
        return [], []
    source = m.V1SecretVolumeSource(secret_name=k8s.hf_token_secret, items=[m.V1KeyToPath(key=HF_TOKEN_KEY, path="token")],
                                    default_mode=0o440)
    return [m.V1Volume(name="hf-token", secret=source)], [m.V1VolumeMount(name="hf-token", mount_path=HF_TOKEN_DIR, read_only=True)]


def controller_env(k8s: KubernetesConfig) -> list[m.V1EnvVar]:
    """The stage env minus HF_HUB_OFFLINE, the store's, then the Hub's (the controller is online)."""
    base = [m.V1EnvVar(name=k, value=v) for k, v in pod_env().items() if k != HUB_OFFLINE]
    return base + _store_env(k8s) + _hub_env(k8s)


def _scratch_volumes(k8s: KubernetesConfig) -> tuple[list[m.V1Volume], list[m.V1VolumeMount]]:
    """The cache (an emptyDir, or kubernetes.cache_claim's PVC), /tmp, and the config's extra volumes."""
    cache = (m.V1Volume(name="cache", persistent_volume_claim=m.V1PersistentVolumeClaimVolumeSource(claim_name=k8s.cache_claim))
             if k8s.cache_claim else m.V1Volume(name="cache", empty_dir=m.V1EmptyDirVolumeSource()))
    volumes = [cache, m.V1Volume(name="tmp", empty_dir=m.V1EmptyDirVolumeSource())]
    mounts = [m.V1VolumeMount(name="cache", mount_path=CACHE_DIR), m.V1VolumeMount(name="tmp", mount_path="/tmp")]
    volumes += [_k8s_model(m.V1Volume, v, f"kubernetes.extra_volumes[{i}]") for i, v in enumerate(k8s.extra_volumes)]
    mounts += [_k8s_model(m.V1VolumeMount, v, f"kubernetes.extra_volume_mounts[{i}]") for i, v in enumerate(k8s.extra_volume_mounts)]
    return volumes, mounts


OWN_VOLUMES = {"cache": CACHE_DIR, "tmp": "/tmp", "config": CONFIG_DIR, "hf-token": HF_TOKEN_DIR, "dshm": "/dev/shm"}  # name -> mount path


def check_pod_fragments(k8s: KubernetesConfig) -> None:
    """The config's PodSpec fragments (extra env, volumes, mounts) parse, and would be accepted by the API
    server next to ours (unique volume names, mounts of declared volumes, none over our paths): one line
    before anything is written, not at the first Job's creation."""
    _extra_env(k8s)
    volumes, mounts = _scratch_volumes(k8s)
    declared = set(OWN_VOLUMES)
    for i, v in enumerate(volumes[2:]):
        if v.name in declared:
            raise ConfigError(f"config: kubernetes.extra_volumes[{i}].name: {v.name!r} is taken"
                              f"{' (the pods use it)' if v.name in OWN_VOLUMES else ''}; give each volume its own name")
        declared.add(v.name)
    for i, mnt in enumerate(mounts[2:]):
        if mnt.name not in declared - set(OWN_VOLUMES):
            raise ConfigError(f"config: kubernetes.extra_volume_mounts[{i}].name: {mnt.name!r} is not in kubernetes.extra_volumes; declare it there")
        if mnt.mount_path.rstrip("/") in OWN_VOLUMES.values():
            raise ConfigError(f"config: kubernetes.extra_volume_mounts[{i}].mountPath: {mnt.mount_path} is where the pods mount their own "
                              "volume; pick another path (kubernetes.cache_claim puts a PVC under the cache)")


def _extra_env(k8s: KubernetesConfig) -> tuple[list[m.V1EnvVar], list[m.V1EnvFromSource] | None]:
    """kubernetes.extra_env (after ours: the last of a name wins) and extra_env_from."""
    env = [_k8s_model(m.V1EnvVar, v, f"kubernetes.extra_env[{i}]") for i, v in enumerate(k8s.extra_env)]
    env_from = [_k8s_model(m.V1EnvFromSource, v, f"kubernetes.extra_env_from[{i}]") for i, v in enumerate(k8s.extra_env_from)]
    return env, env_from or None


def _resources(res: StageResources) -> m.V1ResourceRequirements:
    # No CPU limit: throttling a tokenizer or data loader only slows the GPU down.
    requests = {"cpu": res.cpu, "memory": res.memory}
    limits = {"memory": res.memory}
    if res.ephemeral_storage:
        requests["ephemeral-storage"] = res.ephemeral_storage
    if res.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(res.gpus)
    return m.V1ResourceRequirements(requests=requests, limits=limits)


def _pod_failure_policy(fatal_exit_codes: list[int]) -> m.V1PodFailurePolicy:
    """Fail at once on exit codes that a retry cannot fix; never count evictions/preemptions."""
    return m.V1PodFailurePolicy(
        rules=[
            m.V1PodFailurePolicyRule(
                action="FailJob",
                on_exit_codes=m.V1PodFailurePolicyOnExitCodesRequirement(container_name=CONTAINER, operator="In", values=fatal_exit_codes),
            ),
            m.V1PodFailurePolicyRule(
                action="Ignore", on_pod_conditions=[m.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]
            ),
        ]
    )


def check_train_layout(processes: int, gpus: int, strategy: str = "ddp") -> None:
    """One training process per GPU of the pod (CPU pods: any number of gloo processes, DDP only)."""
    if processes > 1 and gpus and processes != gpus:
        raise ConfigError(f"config: train.distributed.processes: {processes} processes on {gpus} GPU(s) per pod; "
                          f"set it to kubernetes.stages.train.gpus ({gpus}), one process per GPU")
    if strategy != "ddp" and not gpus:
        raise ConfigError(f"config: train.distributed.strategy: {strategy} on pods without GPUs (kubernetes.stages.train.gpus: 0); "
                          "accelerate shards a model only on GPUs: give the train stage GPUs, or use strategy ddp")
    if strategy != "ddp" and processes != gpus:  # the shards are the processes: an idle GPU would hold none
        raise ConfigError(f"config: train.distributed.processes: {processes} process(es) on {gpus} GPU(s) per pod under strategy "
                          f"{strategy}; set it to kubernetes.stages.train.gpus ({gpus}), one process per GPU")


def rendezvous_endpoint(job: str, leader: str = "0") -> str:
    """Pod `leader` (0, or a group's first pod) of an Indexed Job is `<job>-<leader>`; with the Job's
    headless Service as subdomain it resolves."""
    return f"{job}-{leader}.{job}:{RDZV_PORT}"


def pod_command(spec: StageSpec, spec_uri: str, res: StageResources, job: str = "") -> list[str]:
    """`cai stage ...`; under torchrun (`cai-torchrun`) where the stage has several processes per pod
    (`launch_layout`) or several pods, which meet through c10d rendezvous at pod 0. A sharded stage over
    several pods is one group of pods per shard, each meeting at its own first pod (`fill_group`)."""
    processes = launch_layout(spec.stage, spec.params, res.gpus, res.nodes)
    check_train_layout(processes, res.gpus, train_strategy(spec.stage, spec.params))
    command = stage_command(spec.stage, spec_uri)
    if processes == 1 and res.nodes == 1:
        return command
    if res.nodes > 1 and shard_count(spec.params) > 1:
        args = launcher(processes, res.nodes, rendezvous_endpoint(job, LEADER), rendezvous_id=f"{job}-{GROUP}")
        command = [*command, "--shard", GROUP]
    else:
        args = launcher(processes, res.nodes, rendezvous_endpoint(job), rendezvous_id=job)
    return ["cai-torchrun", *args, "-m", "jobs.cli", *command[1:]]


def build_rendezvous_service(job: m.V1Job) -> m.V1Service:
    """The headless Service of a multi-node Job: DNS names for its pods (`<job>-<index>.<job>`),
    published before they are ready, so pod 0's rendezvous is reachable while the others start."""
    name = job.metadata.name
    return m.V1Service(
        api_version="v1", kind="Service",
        metadata=m.V1ObjectMeta(name=name, namespace=job.metadata.namespace, labels=dict(job.metadata.labels)),
        spec=m.V1ServiceSpec(cluster_ip="None", selector={JOB_LABEL: name}, publish_not_ready_addresses=True,
                             ports=[m.V1ServicePort(name="rendezvous", port=RDZV_PORT, target_port=RDZV_PORT)]),
    )


def _gang_failure_policy() -> m.V1PodFailurePolicy:
    """One pod of a multi-node run failing fails the whole attempt: the others cannot go on without it."""
    return m.V1PodFailurePolicy(rules=[
        m.V1PodFailurePolicyRule(
            action="FailJob", on_exit_codes=m.V1PodFailurePolicyOnExitCodesRequirement(container_name=CONTAINER, operator="NotIn", values=[0])),
        m.V1PodFailurePolicyRule(
            action="Ignore", on_pod_conditions=[m.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
    ])


def build_job(spec: StageSpec, spec_uri: str, k8s: KubernetesConfig, namespace: str | None = None, inputs_hash: str | None = None) -> m.V1Job:
    """The batch/v1 Job that runs one StageSpec; sharded or multi-node specs become Indexed Jobs (one pod per
    shard, or a group of `nodes` pods per shard).
    `inputs_hash` (the spec with its inputs' content digests) is what an existing Job of the same name
    must also carry to be adopted: `cai render` has no store to digest, so it leaves it out."""
    res = k8s.stages[spec.stage]
    field = f"kubernetes.stages.{spec.stage}"
    labels = stage_labels(spec, k8s)
    name = job_name(spec, spec_uri)
    pod_security, container_security = _security(k8s)
    volumes, mounts = _scratch_volumes(k8s)
    if res.gpus and res.shm_size:  # NCCL and vLLM's workers talk through /dev/shm; a container's default is 64 MiB
        volumes.append(m.V1Volume(name="dshm", empty_dir=m.V1EmptyDirVolumeSource(medium="Memory", size_limit=res.shm_size)))
        mounts.append(m.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    extra_env, env_from = _extra_env(k8s)
    nodes = res.nodes
    container = m.V1Container(
        name=CONTAINER,
        image=stage_image(spec.stage, k8s),
        image_pull_policy=k8s.image_pull_policy,
        command=pod_command(spec, spec_uri, res, name),
        ports=[m.V1ContainerPort(name="rendezvous", container_port=RDZV_PORT)] if nodes > 1 else None,
        # the local executor's env, then the plumbing; Indexed Jobs add JOB_COMPLETION_INDEX themselves
        env=[m.V1EnvVar(name=k, value=v) for k, v in pod_env().items()] + _store_env(k8s) + extra_env,
        env_from=env_from,
        resources=_resources(res),
        security_context=container_security,
        volume_mounts=mounts,
    )
    pod = m.V1PodSpec(
        restart_policy="Never",
        containers=[container],
        service_account_name=k8s.service_account,
        automount_service_account_token=False,  # stages never call the Kubernetes API
        image_pull_secrets=[m.V1LocalObjectReference(name=s) for s in k8s.image_pull_secrets] or None,
        priority_class_name=k8s.priority_class,
        node_selector=res.node_selector or None,
        tolerations=[_k8s_model(m.V1Toleration, t, f"{field}.tolerations[{i}]") for i, t in enumerate(res.tolerations)] or None,
        affinity=_k8s_model(m.V1Affinity, res.affinity, f"{field}.affinity") if res.affinity else None,
        security_context=pod_security,
        volumes=volumes,
        subdomain=name if nodes > 1 else None,  # `<job>-<index>.<job>`: the rendezvous Service's DNS names
    )
    pods = shard_count(spec.params) * nodes  # a multi-node stage: a group of `nodes` pods per shard, one Indexed Job
    return m.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=m.V1ObjectMeta(
            name=name, namespace=namespace, labels=labels,
            annotations={SPEC_HASH: spec.spec_hash(), SPEC_URI: spec_uri, **({INPUTS_HASH: inputs_hash} if inputs_hash else {}),
                         **checkov_skips(container.image, k8s, cpu_limit=False, api_token=False)},
        ),
        spec=m.V1JobSpec(
            completion_mode="Indexed" if pods > 1 else "NonIndexed",
            completions=pods,
            parallelism=pods,
            backoff_limit=k8s.backoff_limit,
            pod_failure_policy=_gang_failure_policy() if nodes > 1 else _pod_failure_policy([EXIT_CONFIG]),
            active_deadline_seconds=res.active_deadline_seconds,
            ttl_seconds_after_finished=k8s.ttl_seconds_after_finished,
            suspend=True if k8s.queue else None,  # Kueue admits (unsuspends) queued Jobs itself
            template=m.V1PodTemplateSpec(
                metadata=m.V1ObjectMeta(labels={**labels, JOB_LABEL: name}, annotations=k8s.annotations or None),
                spec=pod,
            ),
        ),
    )


# --- the controller in the cluster (`cai submit`) ---------------------------------------------------
def controller_names(run_id: str) -> tuple[str, str]:
    """(Job name, ConfigMap name) of a run's controller."""
    return dns_label(f"{_prefixed(run_id)}-controller", run_id), dns_label(f"{_prefixed(run_id)}-config", run_id)


def build_config_map(run_id: str, run_yaml: str, constitution_yaml: str, k8s: KubernetesConfig, namespace: str | None = None) -> m.V1ConfigMap:
    return m.V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=m.V1ObjectMeta(name=controller_names(run_id)[1], namespace=namespace, labels=common_labels(run_id, "config", k8s)),
        data={"run.yaml": run_yaml, "constitution.yaml": constitution_yaml},
    )


def controller_command(run_id: str, store: str) -> list[str]:
    return ["cai", "run", "-c", f"{CONFIG_DIR}/run.yaml", "--executor", "kubernetes", "--store", store, "--run-id", run_id]


def build_controller_job(run_id: str, store: str, k8s: KubernetesConfig, namespace: str | None = None) -> m.V1Job:
    """The Job that runs `cai run --executor kubernetes` in the cluster, as kubernetes.controller_service_account."""
    job, config_map = controller_names(run_id)
    labels = common_labels(run_id, "controller", k8s)
    pod_security, container_security = _security(k8s)
    volumes, mounts = _scratch_volumes(k8s)
    extra_env, env_from = _extra_env(k8s)
    volumes.append(m.V1Volume(name="config", config_map=m.V1ConfigMapVolumeSource(name=config_map)))
    mounts.append(m.V1VolumeMount(name="config", mount_path=CONFIG_DIR, read_only=True))
    token_volumes, token_mounts = _hub_token_volume(k8s)
    volumes += token_volumes
    mounts += token_mounts
    downward = [  # who holds the run lock, and where stage Jobs go by default
        m.V1EnvVar(name=n, value_from=m.V1EnvVarSource(field_ref=m.V1ObjectFieldSelector(field_path=f)))
        for n, f in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"))
    ]
    container = m.V1Container(
        name=CONTAINER,
        image=controller_image(k8s),
        image_pull_policy=k8s.image_pull_policy,
        command=controller_command(run_id, store),
        env=controller_env(k8s) + downward + extra_env,
        env_from=env_from,
        resources=m.V1ResourceRequirements(
            requests={"cpu": CONTROLLER_CPU, "memory": CONTROLLER_MEMORY,
                      **({"ephemeral-storage": k8s.controller_ephemeral_storage} if k8s.controller_ephemeral_storage else {})},
            limits={"cpu": CONTROLLER_CPU_LIMIT, "memory": CONTROLLER_MEMORY}
        ),
        security_context=container_security,
        volume_mounts=mounts,
    )
    pod = m.V1PodSpec(
        restart_policy="Never",
        containers=[container],
        service_account_name=k8s.controller_service_account,
        image_pull_secrets=[m.V1LocalObjectReference(name=s) for s in k8s.image_pull_secrets] or None,
        security_context=pod_security,
        volumes=volumes,
    )
    return m.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=m.V1ObjectMeta(name=job, namespace=namespace, labels=labels, annotations={
            "cai-jobs/store": store, **checkov_skips(container.image, k8s, cpu_limit=True, api_token=True)}),
        spec=m.V1JobSpec(
            completions=1,
            parallelism=1,
            backoff_limit=k8s.backoff_limit,
            pod_failure_policy=_pod_failure_policy(CONTROLLER_FATAL_EXITS),
            ttl_seconds_after_finished=k8s.ttl_seconds_after_finished,
            template=m.V1PodTemplateSpec(metadata=m.V1ObjectMeta(labels={**labels, JOB_LABEL: job}), spec=pod),
        ),
    )


def build_service_account(k8s: KubernetesConfig, namespace: str | None = None) -> m.V1ServiceAccount:
    return m.V1ServiceAccount(
        api_version="v1", kind="ServiceAccount",
        metadata=m.V1ObjectMeta(name=k8s.controller_service_account, namespace=namespace, labels=_rbac_labels(k8s)),
    )


def controller_rules() -> list[m.V1PolicyRule]:
    """What the controller sends, nothing more (tests/test_rbac.py records it): create, poll and
    delete stage Jobs, list their pods, read pod logs, create and delete a multi-node Job's
    headless Service. It polls, so no watch; the kubelet mounts its
    ConfigMap and the run lock lives in the store, so no configmaps or leases."""
    return [
        m.V1PolicyRule(api_groups=["batch"], resources=["jobs"], verbs=["create", "get", "delete"]),
        m.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list"]),
        m.V1PolicyRule(api_groups=[""], resources=["pods/log"], verbs=["get"]),
        m.V1PolicyRule(api_groups=[""], resources=["services"], verbs=["create", "delete"]),  # multi-node rendezvous
    ]


def _rbac_labels(k8s: KubernetesConfig) -> dict[str, str]:
    return {**k8s.labels, "app.kubernetes.io/name": "cai-jobs", "app.kubernetes.io/component": "controller",
            "app.kubernetes.io/managed-by": "cai-jobs", "app.kubernetes.io/part-of": PART_OF}


def build_role(k8s: KubernetesConfig, namespace: str | None = None) -> m.V1Role:
    return m.V1Role(
        api_version="rbac.authorization.k8s.io/v1", kind="Role",
        metadata=m.V1ObjectMeta(name=k8s.controller_service_account, namespace=namespace, labels=_rbac_labels(k8s)),
        rules=controller_rules(),
    )


def build_role_binding(k8s: KubernetesConfig, namespace: str | None = None) -> m.V1RoleBinding:
    return m.V1RoleBinding(
        api_version="rbac.authorization.k8s.io/v1", kind="RoleBinding",
        metadata=m.V1ObjectMeta(name=k8s.controller_service_account, namespace=namespace, labels=_rbac_labels(k8s)),
        role_ref=m.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=k8s.controller_service_account),
        subjects=[m.RbacV1Subject(kind="ServiceAccount", name=k8s.controller_service_account, namespace=namespace)],
    )


# --- rendering ------------------------------------------------------------------------------------
def to_dict(obj: Any) -> dict[str, Any]:
    """The object as the API server receives it (camelCase keys, unset fields left out)."""
    return ApiClient().sanitize_for_serialization(obj)


def to_yaml(objs: list[Any], comments: list[str] | None = None) -> str:
    """Multi-document YAML, `kubectl apply -f -` ready; offline."""
    head = "".join(f"# {c}\n" for c in comments or [])
    docs = [yaml.safe_dump(to_dict(o), sort_keys=False, default_flow_style=False, width=1000) for o in objs]
    return head + "---\n" + "---\n".join(docs)
