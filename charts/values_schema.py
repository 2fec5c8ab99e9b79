"""Write charts/cai/values.schema.json: the chart's own values, plus `run` derived from RunConfig.

Helm checks values against this draft-07 schema at `helm install`/`helm template`, so a typo under
`run` (say `generate.revison_rounds`) fails at install instead of in the controller pod hours later.
`run` is RunConfig's JSON schema without the four keys the chart fills in itself; RunConfig stays the
single source of truth, and tests/test_helm.py fails if the committed file is stale. Regenerate with:

    .venv/bin/python charts/values_schema.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "charts" / "cai" / "values.schema.json"
STAGES = ("generate", "judge", "train", "evaluate")
# Filled in by the chart from the other values; not allowed under `run`.
CHART_MANAGED = ("store", "executor", "constitution", "kubernetes")

QUANTITY = r"^[+]?[0-9.]+([eE][-+]?[0-9]+|[numkKMGTPE]i?)?$"  # Kubernetes resource quantity
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
CIDR = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"
PORTS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1, "maximum": 65535}, "description": "TCP ports."}
CRON = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|@every \S+|\S+( +\S+){4})$"


def _obj(props: dict[str, Any], desc: str | None = None, required: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    if desc:
        out["description"] = desc
    return out


def _str(desc: str, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "description": desc, **kw}


def _int(desc: str, minimum: int = 0, nullable: bool = False) -> dict[str, Any]:
    return {"type": ["integer", "null"] if nullable else "integer", "minimum": minimum, "description": desc}


def _quantity(desc: str, nullable: bool = False) -> dict[str, Any]:
    types = ["string", "number"] + (["null"] if nullable else [])
    return {"type": types, "pattern": QUANTITY, "description": desc}


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
TOLERATION = _obj({
    "key": {"type": "string"},
    "operator": {"enum": ["Exists", "Equal"]},
    "value": {"type": "string"},
    "effect": {"enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]},
    "tolerationSeconds": {"type": "integer"},
}, "A PodSpec toleration (camelCase keys).")
PLACEMENT = {
    "nodeSelector": {**STRING_MAP, "description": "nodeSelector of the pods."},
    "tolerations": {"type": "array", "items": {"$ref": "#/definitions/toleration"}, "description": "Pod tolerations."},
    "affinity": {"type": "object", "description": "Pod affinity, as in a PodSpec; {} = none."},
}


def image_ref(desc: str) -> dict[str, Any]:
    return _obj({
        "repository": _str("Image repository; empty = the default for this component."),
        "tag": _str("Image tag; empty = images.tag."),
        "digest": _str("Image digest (sha256:<64 hex>); wins over the tag. Empty = by tag.", pattern=r"^(sha256:[a-f0-9]{64})?$"),
    }, desc)


def stage_resources(name: str) -> dict[str, Any]:
    return _obj({
        "gpus": _int("nvidia.com/gpu request and limit per pod (0 = CPU only)."),
        "gpuMemoryGiB": {"type": ["number", "null"], "exclusiveMinimum": 0, "description": "Memory of one GPU (GiB); null = no fit check."},
        "nodes": _int("Pods of one run of the stage (torchrun c10d rendezvous at pod 0): train over every GPU of every pod; "
                      "generate/judge with run.engine.backend vllm, one model pipeline parallel across the pods.", minimum=1),
        "cpu": _quantity("CPU request."),
        "memory": _quantity("Memory request and limit."),
        "ephemeralStorage": _quantity("Scratch space request; null = none.", nullable=True),
        **PLACEMENT,
        "activeDeadlineSeconds": _int("Kill the Job after this long; null = never.", minimum=1, nullable=True),
    }, f"Pods of the {name} stage Jobs.", required=["gpus", "cpu", "memory"])


def run_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(`run` schema, its definitions) from RunConfig, chart-managed keys removed, titles dropped."""
    sys.path.insert(0, str(REPO))
    from jobs.config import RunConfig

    raw = RunConfig.model_json_schema(ref_template="#/definitions/{model}")
    defs = raw.pop("$defs", {})

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "title"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    run = strip(raw)
    for key in CHART_MANAGED:
        run["properties"].pop(key, None)
    run["description"] = (
        "The RunConfig body (keys as in recipes/*.yaml). store, executor, constitution and kubernetes "
        "are set by the chart from s3, constitution, images, stages and the scheduling values."
    )
    used = json.dumps(run)
    defs = {k: strip(v) for k, v in defs.items()}
    # KubernetesConfig and what only it uses are chart-managed: leave them out.
    changed = True
    keep: dict[str, Any] = {}
    while changed:
        changed = False
        for name, d in defs.items():
            if name not in keep and f'"#/definitions/{name}"' in used:
                keep[name] = d
                used += json.dumps(d)
                changed = True
    return run, dict(sorted(keep.items()))


def build() -> dict[str, Any]:
    run, run_defs = run_schema()
    from jobs.constitution import shipped_names

    props = {
        "images": _obj({
            "repository": _str("Prefix of every image: controller <repository>, stages <repository>-<stage>.", minLength=1),
            "tag": _str("Tag of every image; empty = the chart's appVersion."),
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"], "description": "imagePullPolicy of every pod."},
            "pullSecrets": {"type": "array", "items": {"type": "string", "pattern": DNS_SUBDOMAIN},
                            "description": "Names of docker-registry Secrets."},
            "controller": image_ref("The controller image (cai run / cai realign)."),
            **{s: image_ref(f"The {s} stage image.") for s in STAGES},
        }, "Container images.", required=["repository", "pullPolicy"]),
        "s3": _obj({
            "bucket": _str("S3 bucket of the artifact store (required).", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
            "prefix": _str("Key prefix inside the bucket; empty = the bucket root.", pattern=r"^[^\s]*$"),
            "endpoint": _str("AWS_ENDPOINT_URL_S3 for S3-compatible stores; empty = AWS.", pattern=r"^(https?://\S+)?$"),
            "existingSecret": _str("Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; empty = IRSA or node role.",
                                   pattern=r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)?$"),
            "irsaRoleArn": _str("IAM role ARN for IRSA (annotation on both ServiceAccounts); empty = none.",
                                pattern=r"^(arn:aws[a-z-]*:iam::[0-9]{12}:role/\S+)?$"),
        }, "The S3 artifact store.", required=["bucket"]),
        "hf": _obj({
            "tokenSecret": _str("Secret with key HF_TOKEN for the controller's Hub downloads (never stage pods); empty = anonymous.",
                                pattern=r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)?$"),
            "endpoint": _str("HF_ENDPOINT of a Hub mirror for the controller; empty = huggingface.co.", pattern=r"^(https?://\S+)?$"),
        }, "Hugging Face Hub access of the controller pods."),
        "constitution": _obj({
            "name": {"enum": shipped_names(), "description": "A constitution shipped in the images."},
            "inline": _str("Constitution YAML text (--set-file constitution.inline=FILE); wins over name."),
        }, "The constitution."),
        "run": run,
        "stages": _obj({s: stage_resources(s) for s in STAGES}, "Stage Job pods.", required=list(STAGES)),
        "priorityClassName": _str("priorityClassName of stage pods; empty = the cluster default."),
        "queue": _str("Kueue LocalQueue of stage Jobs; empty = no Kueue."),
        "backoffLimit": _int("Pod retries per stage Job."),
        "ttlSecondsAfterFinished": _int("Delete finished Jobs after this many seconds."),
        "pollSeconds": {"type": "number", "exclusiveMinimum": 0, "description": "Controller poll interval (s)."},
        "jobLabels": {**STRING_MAP, "description": "Extra labels on stage Jobs and pods."},
        "podAnnotations": {**STRING_MAP, "description": "Extra annotations on stage pods."},
        "controller": _obj({
            "resources": _obj({
                "requests": {"type": "object", "additionalProperties": _quantity("A quantity."), "description": "Resource requests."},
                "limits": {"type": "object", "additionalProperties": _quantity("A quantity."), "description": "Resource limits."},
            }, "Controller container resources."),
            **PLACEMENT,
            "priorityClassName": _str("priorityClassName of controller pods."),
            "backoffLimit": _int("Controller pod retries (infrastructure failures only)."),
        }, "Controller pods (install Job and CronJob)."),
        "extraEnv": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {"name": _str("Variable name.", minLength=1)}},
                     "description": "EnvVars (PodSpec) after every pod's own env, the stage pods' too (kubernetes.extra_env)."},
        "extraEnvFrom": {"type": "array", "items": {"type": "object", "minProperties": 1},
                         "description": "EnvFromSources (PodSpec) of every pod's container, the stage pods' too (kubernetes.extra_env_from)."},
        "extraVolumes": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {"name": _str("Volume name.", pattern=DNS_LABEL)}},
                         "description": "Volumes (PodSpec) of every pod, the stage pods' too (kubernetes.extra_volumes)."},
        "extraVolumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"], "properties": {
                                  "name": _str("Name of a volume in extraVolumes.", minLength=1),
                                  "mountPath": _str("Absolute path in the container.", pattern=r"^/")}},
                              "description": "VolumeMounts (PodSpec) of extraVolumes in every container (kubernetes.extra_volume_mounts)."},
        "modelCache": _obj({
            "enabled": {"type": "boolean", "description": "Mount a PersistentVolumeClaim as the controller pods' cache (/var/cache/cai)."},
            "stages": {"type": "boolean", "description": "Also the stage pods' cache (kubernetes.cache_claim); needs ReadWriteMany."},
            "size": _quantity("Storage request of the claim the chart renders."),
            "storageClassName": _str("StorageClass of that claim; empty = the cluster default, \"-\" = none.",
                                     pattern=r"^(-|([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?))$|^$"),
            "accessModes": {"type": "array", "minItems": 1, "uniqueItems": True,
                            "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                            "description": "accessModes of that claim."},
            "existingClaim": _str("An existing claim to mount instead; empty = the chart renders one.",
                                  pattern=r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)?$"),
        }, "Optional PersistentVolumeClaim for the controller pods' model cache.", required=["enabled"]),
        "runOnInstall": {"type": "boolean", "description": "Create a controller Job (cai run) with the release."},
        "realign": _obj({
            "enabled": {"type": "boolean", "description": "Render the realignment CronJob."},
            "schedule": _str("Cron schedule (5 fields or @daily, @weekly ...).", pattern=CRON),
            "timeZone": _str("IANA time zone of the schedule; empty = the controller manager's."),
            "suspend": {"type": "boolean", "description": "Skip ticks until resumed."},
            "startingDeadlineSeconds": _int("Skip a tick missed by more than this; null = never skip.", nullable=True),
            "successfulJobsHistoryLimit": _int("Finished Jobs kept."),
            "failedJobsHistoryLimit": _int("Failed Jobs kept."),
            "activeDeadlineSeconds": _int("Kill a realignment after this long; null = never.", minimum=1, nullable=True),
        }, "Scheduled realignment (CronJob running cai realign).", required=["enabled", "schedule", "suspend"]),
        "nameOverride": _str("Replaces the chart name in the release's fullname.", pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"),
        "fullnameOverride": _str("Replaces the fullname every object is named from (cut to 40 characters).",
                                 pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"),
        "serviceAccount": _obj({
            c: _obj({
                "create": {"type": "boolean", "description": f"Create the {c} ServiceAccount; false = use an existing one."},
                "name": _str(f"The {c} ServiceAccount's name; empty = <fullname>-{c}.", pattern=r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)?$"),
                "annotations": {**STRING_MAP, "description": "Annotations (a cloud identity); a role-arn here wins over s3.irsaRoleArn."},
            }, f"The {c} pods' ServiceAccount.", required=["create"])
            for c in ("controller", "stage")
        }, "ServiceAccounts of the controller and the stage pods.", required=["controller", "stage"]),
        "rbac": _obj({
            "create": {"type": "boolean", "description": "Create the controller's Role and RoleBinding."},
        }, "RBAC.", required=["create"]),
        "podSecurityContext": {"type": "object", "description": "securityContext of every pod (controller and stages), as in a "
                               "PodSpec; OpenShift: set the UID fields to null."},
        "networkPolicy": _obj({
            "enabled": {"type": "boolean", "description": "Render the NetworkPolicies."},
            "dns": _obj({
                "namespace": _str("Namespace of the cluster DNS pods.", minLength=1),
                "podLabels": {**STRING_MAP, "description": "Labels of the cluster DNS pods; {} = every pod there."},
                "ports": PORTS,
            }, "Egress to the cluster DNS (every pod).", required=["namespace", "ports"]),
            **{k: _obj({
                "cidrs": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": CIDR}, "description": "Allowed address blocks."},
                "except": {"type": "array", "items": {"type": "string", "pattern": CIDR}, "description": "Blocks cut out of them."},
                "ports": PORTS,
            }, d, required=["cidrs", "ports"]) for k, d in (
                ("store", "Egress to the S3 store (every pod)."),
                ("hub", "Egress to the Hugging Face Hub (controller only)."),
                ("apiServer", "Egress to the Kubernetes API server (controller only)."),
            )},
        }, "Optional NetworkPolicies.", required=["enabled"]),
        "global": {"type": "object", "description": "Helm's shared values for subcharts (unused)."},
    }
    schema = _obj(props, "Values of the cai chart (generated by charts/values_schema.py).", required=["s3", "images", "stages"])
    return {"$schema": "http://json-schema.org/draft-07/schema#", **schema,
            "definitions": {"toleration": TOLERATION, **run_defs}}


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    SCHEMA_PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {SCHEMA_PATH.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
