"""What a run puts on a cluster: `cai render` (every manifest, offline) and `cai submit` (the controller).

Render plans with the controller's own planner (`Controller.plan_base`/`plan_round`) on a store
stand-in that has a URI and nothing else, so a dry run cannot write anything and prints exactly
the Jobs a run submits. Submit creates a ConfigMap (run.yaml + constitution.yaml) and a controller
Job that runs `cai run --executor kubernetes` in the cluster as ServiceAccount cai-controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, StageSpec
from ..constitution import resolve_path
from ..controller import Controller, default_run_id
from ..errors import SubmitError
from ..store import open_store
from ..uploads import upload_local_inputs
from .k8s_manifests import (
    CONFIG_DIR, build_config_map, build_rendezvous_service, build_controller_job, build_job, build_role, build_role_binding,
    build_service_account, controller_image, to_yaml,
)
from .kubernetes import KubernetesExecutor, api_error, job_state, log


@dataclass(frozen=True)
class PlanStore:
    """A store's address without its contents: planning needs URIs only."""

    uri: str

    @classmethod
    def for_uri(cls, uri: str) -> PlanStore:
        return cls(uri.rstrip("/") if uri.startswith("s3://") else open_store(uri).uri)

    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"


def planned_specs(config: RunConfig, store_uri: str, run_id: str | None = None) -> list[tuple[StageSpec, str]]:
    """(spec, spec URI) of every stage Job the run's first round submits, the base evaluation first."""
    store = PlanStore.for_uri(store_uri)
    ctl = Controller(config, store, executor=None, run_id=run_id)  # type: ignore[arg-type]
    ctl._check_dependencies()
    inputs = ctl.input_keys()
    specs: list[StageSpec] = []
    baseline = None
    if "evaluate" in config.stages:
        base = ctl.plan_base(inputs)
        specs.append(base)
        baseline = f"{base.output}/report.json"
    specs += ctl.plan_round(1, config.model, inputs, baseline)[0]
    return [(s, store.uri_for(s.spec_key)) for s in specs]


def controller_config(config: RunConfig, store_uri: str) -> tuple[RunConfig, str]:
    """The config the controller pod loads from its ConfigMap, and the constitution text beside it.
    A constitution given as a file here is read from the ConfigMap there; a shipped name stays a name
    (the image has it), so the run id is the same as a local `cai run` of the same config."""
    path = resolve_path(config.constitution)
    updates: dict[str, Any] = {"executor": "kubernetes", "store": store_uri}
    if Path(config.constitution).exists():
        updates["constitution"] = f"{CONFIG_DIR}/constitution.yaml"
    return config.model_copy(update=updates), path.read_text(encoding="utf-8")


def render(config: RunConfig, store_uri: str, run_id: str | None = None, namespace: str | None = None, controller: bool = False) -> str:
    """Every manifest of the run as multi-document YAML (no network, no store writes)."""
    ns = namespace or config.kubernetes.namespace
    if controller:  # what `cai submit` hands the pod: local paths as the store keys it uploads them to
        config, constitution = controller_config(upload_local_inputs(config, None)[0], store_uri)
    run_id = run_id or default_run_id(config)
    specs = planned_specs(config, store_uri, run_id)
    objs: list[Any] = []
    notes = [f"cai render: run {run_id}, store {PlanStore.for_uri(store_uri).uri}",
             f"{len(specs)} stage Job(s): {'base evaluation and ' if specs and specs[0][0].round == 0 else ''}round 1; "
             "later rounds differ in round, model and inputs"]
    if not store_uri.startswith("s3://"):
        notes.append("warning: the store is a local directory, which pods cannot read; use --store s3://bucket/prefix")
    if controller:
        notes.append(f"controller: image {controller_image(config.kubernetes)}, ServiceAccount {config.kubernetes.controller_service_account} (RBAC below)")
        k8s = config.kubernetes
        run_yaml = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        objs += [build_service_account(k8s, ns), build_role(k8s, ns), build_role_binding(k8s, ns),
                 build_config_map(run_id, run_yaml, constitution, k8s, ns), build_controller_job(run_id, store_uri, k8s, ns)]
    for spec, uri in specs:
        job = build_job(spec, uri, config.kubernetes, ns)
        if job.spec.template.spec.subdomain:  # a multi-node Job: the executor creates its Service first
            objs.append(build_rendezvous_service(job))
        objs.append(job)
    return to_yaml(objs, notes)


@dataclass
class Submitted:
    run_id: str
    namespace: str
    job: str
    config_map: str
    state: str  # created | running | recreated


def submit(config: RunConfig, store_uri: str, batch_api: Any, core_api: Any, namespace: str,
           run_id: str | None = None) -> Submitted:
    """Create (or refresh) the run's ConfigMap and its controller Job; an active controller is left alone."""
    from kubernetes.client.exceptions import ApiException

    pod_config, constitution = controller_config(config, store_uri)
    run_id = run_id or default_run_id(pod_config)
    k8s = pod_config.kubernetes
    sa = k8s.controller_service_account
    try:
        core_api.read_namespaced_service_account(sa, namespace)
    except ApiException as e:
        if e.status == 404:
            raise SubmitError(f"serviceaccount {namespace}/{sa}: not found; install the chart (helm install cai charts/cai -n {namespace}), "
                              f"set kubernetes.controller_service_account to its <release>-controller, "
                              f"or apply the RBAC from `cai render --controller -n {namespace}`") from None
        raise api_error(f"read serviceaccount {namespace}/{sa}", e) from None
    except Exception as e:
        raise api_error(f"read serviceaccount {namespace}/{sa}", e) from None

    run_yaml = yaml.safe_dump(pod_config.model_dump(mode="json"), sort_keys=False)
    cm = build_config_map(run_id, run_yaml, constitution, k8s, namespace)
    try:
        core_api.create_namespaced_config_map(namespace, cm)
    except ApiException as e:
        if e.status != 409:
            raise api_error(f"create configmap {namespace}/{cm.metadata.name}", e) from None
        _call(f"patch configmap {namespace}/{cm.metadata.name}", core_api.patch_namespaced_config_map, cm.metadata.name, namespace, {"data": cm.data})

    job = build_controller_job(run_id, store_uri, k8s, namespace)
    name, state = job.metadata.name, "created"
    jobs = KubernetesExecutor(batch_api, core_api, None, k8s, namespace=namespace)  # type: ignore[arg-type]
    try:
        batch_api.create_namespaced_job(namespace, job)
    except ApiException as e:
        if e.status != 409:
            raise api_error(f"create job {namespace}/{name}", e) from None
        existing = jobs._read(name)
        if existing is not None and job_state(existing)[0] is None:
            state = "running"
        else:  # finished: start a fresh controller, which resumes the run from the store
            log(f"job {namespace}/{name}: finished before; replacing it")
            jobs._delete(name)
            _call(f"create job {namespace}/{name}", batch_api.create_namespaced_job, namespace, job)
            state = "recreated"
    return Submitted(run_id, namespace, name, cm.metadata.name, state)


def _call(what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:
        raise api_error(what, e) from None
