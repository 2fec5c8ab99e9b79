"""A small, pure RBAC authorizer: what the Kubernetes API server would answer to a request.

`request_info` maps an HTTP request to attributes the way the API server's RequestInfoResolver
(k8s.io/apiserver/pkg/endpoints/request/requestinfo.go) does, and `rule_allows` matches them
against a PolicyRule the way the RBAC authorizer does (k8s.io/kubernetes/pkg/apis/rbac/v1/
evaluation_helpers.go). The emulated API server enforces no RBAC, so this is how the tests find a
request that a real cluster would answer with 403.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable

API_PREFIXES = ("api", "apis")
SPECIAL_VERBS = ("proxy", "watch")  # /api/v1/watch/... and /api/v1/proxy/...
NAMESPACE_SUBRESOURCES = ("status", "finalize")  # /api/v1/namespaces/NAME/status is the namespace's own
VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
TRUE = {"1", "t", "T", "true", "TRUE", "True"}  # Go's strconv.ParseBool, which reads ?watch=


@dataclass(frozen=True)
class RequestInfo:
    """The attributes RBAC decides on; `resource` is empty for a non-resource URL such as /version."""

    verb: str
    path: str
    group: str = ""
    version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def is_resource(self) -> bool:
        return bool(self.resource)

    @property
    def combined(self) -> str:
        """`jobs` or `jobs/status`: what a rule's `resources` entry names."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def request_info(method: str, path: str, query: str = "") -> RequestInfo:
    """The API server's reading of a request (RequestInfoResolver.NewRequestInfo)."""
    verb = VERBS.get(method.upper(), method.lower())
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or parts[0] not in API_PREFIXES:
        return RequestInfo(verb=verb, path=path)
    if parts[0] == "api":  # the legacy core group: /api/v1/...
        if len(parts) < 2:
            return RequestInfo(verb=verb, path=path)
        group, version, rest = "", parts[1], parts[2:]
    else:  # /apis/GROUP/VERSION/...
        if len(parts) < 3:
            return RequestInfo(verb=verb, path=path)
        group, version, rest = parts[1], parts[2], parts[3:]
    if not rest:  # discovery, e.g. GET /apis/batch/v1
        return RequestInfo(verb=verb, path=path)
    if rest[0] in SPECIAL_VERBS:
        if len(rest) < 2:
            return RequestInfo(verb=verb, path=path)
        verb, rest = rest[0], rest[1:]
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
            rest = rest[2:]  # a namespaced resource; otherwise the namespace object itself
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else ""
    subresource = rest[2] if len(rest) >= 3 and verb != "proxy" else ""
    params = urllib.parse.parse_qs(query)
    if not name and verb == "get":  # a collection: list, or watch with ?watch=true
        verb = "watch" if params.get("watch", [""])[-1] in TRUE else "list"
        name = _name_from_selector(params.get("fieldSelector", [""])[-1])  # one object asked for by name
    if not name and verb == "delete":
        verb = "deletecollection"
    return RequestInfo(verb, path, group, version, resource, subresource, namespace, name)


def _name_from_selector(selector: str) -> str:
    """`metadata.name=x` (or `==`) among a field selector's terms, as fields.RequiresExactMatch reads it."""
    for term in selector.split(","):
        key, op, value = term.partition("==") if "==" in term else term.partition("=")
        if op and key.strip() == "metadata.name" and not key.endswith("!"):
            return value.strip()
    return ""


def rule_allows(rule: dict[str, Any], info: RequestInfo) -> bool:
    """RBAC's RuleAllows for a PolicyRule as rendered YAML (camelCase keys)."""
    verbs = rule.get("verbs") or []
    if "*" not in verbs and info.verb not in verbs:
        return False
    if not info.is_resource:
        return any(u == info.path or u == "*" or (u.endswith("*") and info.path.startswith(u[:-1])) for u in rule.get("nonResourceURLs") or [])
    groups = rule.get("apiGroups") or []
    if "*" not in groups and info.group not in groups:
        return False
    if not any(_resource_matches(r, info) for r in rule.get("resources") or []):
        return False
    names = rule.get("resourceNames") or []
    return not names or info.name in names


def _resource_matches(rule_resource: str, info: RequestInfo) -> bool:
    """`*` matches everything (subresources too), `jobs` only `jobs`, `*/status` any resource's status."""
    if rule_resource in ("*", info.combined):
        return True
    return bool(info.subresource) and rule_resource == f"*/{info.subresource}"


def role_allows(role: dict[str, Any], info: RequestInfo) -> bool:
    """A Role grants only inside its own namespace, and never cluster-scoped requests or non-resource URLs."""
    if not info.is_resource or info.namespace != role["metadata"].get("namespace"):
        return False
    return any(rule_allows(rule, info) for rule in role.get("rules") or [])


Grant = tuple[str, str, str]  # (apiGroup, resource or resource/subresource, verb)


def grants(role: dict[str, Any]) -> set[Grant]:
    """Every (group, resource, verb) the Role's rules name, wildcards left as written."""
    return {(g, r, v) for rule in role.get("rules") or [] for g in rule.get("apiGroups") or []
            for r in rule.get("resources") or [] for v in rule.get("verbs") or []}


def needed(infos: Iterable[RequestInfo]) -> set[Grant]:
    return {(i.group, i.combined, i.verb) for i in infos if i.is_resource}


def denied(role: dict[str, Any], infos: Iterable[RequestInfo]) -> list[RequestInfo]:
    return [i for i in infos if not role_allows(role, i)]
