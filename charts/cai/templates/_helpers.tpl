{{/*
Names. CronJob names may be at most 52 characters (the controller appends 11 to its Jobs), so the
release-derived base is cut to 40 to leave room for "-realign".
*/}}
{{- define "cai.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := .Values.nameOverride | default .Chart.Name -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ServiceAccount names: the given name, or <fullname>-controller / <fullname>-stage. The controller's
Role and RoleBinding carry its name too. */}}
{{- define "cai.controllerServiceAccount" -}}
{{- .Values.serviceAccount.controller.name | default (printf "%s-controller" (include "cai.fullname" .)) -}}
{{- end -}}

{{- define "cai.stageServiceAccount" -}}
{{- .Values.serviceAccount.stage.name | default (printf "%s-stage" (include "cai.fullname" .)) -}}
{{- end -}}

{{- define "cai.configMapName" -}}
{{- printf "%s-config" (include "cai.fullname" .) -}}
{{- end -}}

{{/* Labels on every object; pod templates get cai.selectorLabels only, which never change on upgrade. */}}
{{- define "cai.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cai.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "cai.selectorLabels" -}}
app.kubernetes.io/name: cai-jobs
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: cai-jobs
{{- end -}}

{{/* On the stage pods the controller creates (run.yaml kubernetes.labels): which release they belong to,
so this release's NetworkPolicy selects them and no other release's. */}}
{{- define "cai.releaseLabel" -}}
cai-jobs/release: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* The store every pod uses: s3://<bucket>[/<prefix>]. */}}
{{- define "cai.store" -}}
{{- $prefix := trimAll "/" .Values.s3.prefix -}}
{{- if $prefix -}}
{{- printf "s3://%s/%s" .Values.s3.bucket $prefix -}}
{{- else -}}
{{- printf "s3://%s" .Values.s3.bucket -}}
{{- end -}}
{{- end -}}

{{- define "cai.tag" -}}
{{- .Values.images.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* Image of one component: (dict "ctx" $ "name" "train"); controller = <repository>, stage = <repository>-<stage>. */}}
{{- define "cai.image" -}}
{{- $img := index .ctx.Values.images .name -}}
{{- $default := ternary .ctx.Values.images.repository (printf "%s-%s" .ctx.Values.images.repository .name) (eq .name "controller") -}}
{{- if $img.digest -}}
{{- printf "%s@%s" ($img.repository | default $default) $img.digest -}}
{{- else -}}
{{- printf "%s:%s" ($img.repository | default $default) ($img.tag | default (include "cai.tag" .ctx)) -}}
{{- end -}}
{{- end -}}

{{/*
checkov's skip annotations on the controller Job and CronJob, each where the product is right and with
its reason (tests/test_checkov.py runs checkov over the rendered chart): the controller needs its token,
and unless pinned by digest or pulled Always, the tag and pull policy are the user's choice.
*/}}
{{- define "cai.checkovSkips" -}}
{{- include "cai.checkovAnnotations" (dict "ctx" . "apiToken" true "extra" (list)) -}}
{{- end -}}

{{/* The same skips for any pod on the controller image: (dict "ctx" $ "apiToken" bool "extra" (list "ID=reason" ...)). */}}
{{- define "cai.checkovAnnotations" -}}
{{- $v := .ctx.Values -}}
{{- $skips := list -}}
{{- if .apiToken -}}
{{- $skips = append $skips "CKV_K8S_38=the controller calls the Kubernetes API (create, get and delete stage Jobs), so it mounts its token" -}}
{{- end -}}
{{- if not (contains "@" (include "cai.image" (dict "ctx" .ctx "name" "controller"))) -}}
{{- $skips = append $skips "CKV_K8S_43=pinned by tag (the chart's appVersion by default); set images.controller.digest to pin by digest" -}}
{{- end -}}
{{- if ne $v.images.pullPolicy "Always" -}}
{{- $skips = append $skips (printf "CKV_K8S_15=%s: release tags are immutable and images are large; set images.pullPolicy to Always if you retag" $v.images.pullPolicy) -}}
{{- end -}}
{{- $skips = concat $skips .extra -}}
{{- range $i, $s := $skips }}
checkov.io/skip{{ add1 $i }}: {{ $s | quote }}
{{- end -}}
{{- end -}}

{{/* The constitution reference in run.yaml: a shipped name, or the ConfigMap file. */}}
{{- define "cai.constitutionRef" -}}
{{- if .Values.constitution.inline -}}
/etc/cai/constitution.yaml
{{- else -}}
{{- .Values.constitution.name -}}
{{- end -}}
{{- end -}}

{{/*
run.yaml: the `run` values (the RunConfig body) plus the cluster settings derived from the other
values, in RunConfig's own keys, so the controller submits stage Jobs with these images and resources.
*/}}
{{- define "cai.runConfig" -}}
{{- $v := .Values -}}
{{- $stages := dict -}}
{{- range $name := list "generate" "judge" "train" "evaluate" -}}
{{- $s := index $v.stages $name -}}
{{- $_ := set $stages $name (dict
    "image" (include "cai.image" (dict "ctx" $ "name" $name))
    "gpus" $s.gpus
    "gpu_memory_gib" ($s.gpuMemoryGiB | default nil)
    "nodes" ($s.nodes | default 1)
    "cpu" (toString $s.cpu)
    "memory" (toString $s.memory)
    "ephemeral_storage" (ternary nil (toString $s.ephemeralStorage) (kindIs "invalid" $s.ephemeralStorage))
    "node_selector" $s.nodeSelector
    "tolerations" $s.tolerations
    "affinity" ($s.affinity | default nil)
    "active_deadline_seconds" $s.activeDeadlineSeconds) -}}
{{- end -}}
{{- $k8s := dict
    "namespace" .Release.Namespace
    "image_repository" $v.images.repository
    "image_tag" (include "cai.tag" .)
    "image_pull_policy" $v.images.pullPolicy
    "image_pull_secrets" $v.images.pullSecrets
    "service_account" (include "cai.stageServiceAccount" .)
    "controller_service_account" (include "cai.controllerServiceAccount" .)
    "pod_security_context" $v.podSecurityContext
    "extra_env" $v.extraEnv
    "extra_env_from" $v.extraEnvFrom
    "extra_volumes" $v.extraVolumes
    "extra_volume_mounts" $v.extraVolumeMounts
    "cache_claim" (ternary (include "cai.modelCacheClaim" .) nil (and $v.modelCache.enabled $v.modelCache.stages))
    "s3_secret" ($v.s3.existingSecret | default nil)
    "s3_endpoint" ($v.s3.endpoint | default nil)
    "hf_token_secret" ($v.hf.tokenSecret | default nil)
    "hf_endpoint" ($v.hf.endpoint | default nil)
    "priority_class" ($v.priorityClassName | default nil)
    "queue" ($v.queue | default nil)
    "backoff_limit" $v.backoffLimit
    "ttl_seconds_after_finished" $v.ttlSecondsAfterFinished
    "poll_seconds" $v.pollSeconds
    "labels" (merge (fromYaml (include "cai.releaseLabel" .)) $v.jobLabels)
    "annotations" $v.podAnnotations
    "stages" $stages -}}
{{- $run := deepCopy $v.run -}}
{{- $_ := set $run "constitution" (include "cai.constitutionRef" .) -}}
{{- $_ := set $run "store" (include "cai.store" .) -}}
{{- $_ := set $run "executor" "kubernetes" -}}
{{- $_ := set $run "kubernetes" $k8s -}}
{{- toYaml $run -}}
{{- end -}}

{{/* Hash of run.yaml and the constitution: names the install Job and rolls pods when either changes. */}}
{{- define "cai.configHash" -}}
{{- printf "%s\n%s" (include "cai.runConfig" .) .Values.constitution.inline | sha256sum | trunc 10 -}}
{{- end -}}

{{/* Pod securityContext from the values (OpenShift: UID fields null); the container's never sets a UID,
so the pod's (or the platform's) applies. */}}
{{- define "cai.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "cai.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The store's env, the same in every pod (k8s_manifests._store_env): the endpoint and a Secret's keys. */}}
{{- define "cai.storeEnv" -}}
{{- with .Values.s3.endpoint }}
- {name: AWS_ENDPOINT_URL_S3, value: {{ . | quote }}}
{{- end }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ . }}, key: AWS_ACCESS_KEY_ID}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ . }}, key: AWS_SECRET_ACCESS_KEY}}
{{- end }}
{{- end -}}

{{/* Where pods on the controller image run (controller.*) and how they pull it: the controller's pods and the helm test pod. */}}
{{- define "cai.controllerPlacement" -}}
{{- $v := .Values -}}
{{- with $v.images.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with $v.controller.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.controller.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.controller.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.controller.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
extraVolumes / extraVolumeMounts, checked here so a clash fails at install with the value's name (the
API server would refuse the pod later, with a less helpful message): no volume may take a name the
chart uses, no mount a path the chart mounts, and every mount names a volume the pod has.
*/}}
{{- define "cai.checkExtraVolumes" -}}
{{- $own := list "cache" "tmp" "config" "hf-token" -}}
{{- $names := $own -}}
{{- range .Values.extraVolumes -}}
{{- if has .name $own -}}
{{- fail (printf "extraVolumes: %q is a volume the chart mounts itself (%s); give yours another name" .name (join ", " $own)) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- range .Values.extraVolumeMounts -}}
{{- if has (trimSuffix "/" .mountPath) (list "/tmp" "/var/cache/cai" "/etc/cai" "/var/run/secrets/cai/hf") -}}
{{- fail (printf "extraVolumeMounts: %s is a path the chart mounts itself (/tmp, /var/cache/cai, /etc/cai, /var/run/secrets/cai/hf); mount yours elsewhere" .mountPath) -}}
{{- end -}}
{{- if not (has .name $names) -}}
{{- fail (printf "extraVolumeMounts: %q (at %s) names no volume; add it to extraVolumes" .name .mountPath) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The model cache's claim: modelCache.existingClaim, or the one the chart renders. */}}
{{- define "cai.modelCacheClaim" -}}
{{- $mc := .Values.modelCache -}}
{{- if and $mc.enabled $mc.stages (not $mc.existingClaim) (not (has "ReadWriteMany" $mc.accessModes)) -}}
{{- fail (printf "modelCache.stages: the stage pods (GPU nodes) mount the claim while the controller holds it, which %s allows on one node only; add ReadWriteMany to modelCache.accessModes, or give an existingClaim" (join "/" $mc.accessModes)) -}}
{{- end -}}
{{- .Values.modelCache.existingClaim | default (printf "%s-model-cache" (include "cai.fullname" .)) -}}
{{- end -}}

{{/*
The controller pod (install Job and CronJob alike): `cai <verb> -c /etc/cai/run.yaml --executor
kubernetes --store s3://...`, the same env, volumes and mounts, in the same order, as `cai submit`'s
controller Job (k8s_manifests.build_controller_job),
the ConfigMap at /etc/cai. It is online (no HF_HUB_OFFLINE): it downloads Hub models and datasets into
the store; the HF token reaches it only, never the stage pods, as a read-only file (HF_TOKEN_PATH).
Its cache (/var/cache/cai: CAI_CACHE_DIR, HF_HOME) is an emptyDir, or the modelCache claim. extraEnv,
extraEnvFrom, extraVolumes and extraVolumeMounts (run.yaml's kubernetes.extra_*: the stage pods get
them too) follow the chart's own. Call with (dict "ctx" $ "verb" "run").
*/}}
{{- define "cai.controllerPod" -}}
{{- $v := .ctx.Values -}}
{{- include "cai.checkExtraVolumes" .ctx -}}
metadata:
  labels:
    {{- include "cai.selectorLabels" .ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
  annotations:
    cai-jobs/config-hash: {{ include "cai.configHash" .ctx }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "cai.controllerServiceAccount" .ctx }}
  {{- with include "cai.controllerPlacement" .ctx }}
  {{- . | trim | nindent 2 }}
  {{- end }}
  securityContext:
    {{- include "cai.podSecurityContext" .ctx | nindent 4 }}
  containers:
    - name: controller
      image: {{ include "cai.image" (dict "ctx" .ctx "name" "controller") | quote }}
      imagePullPolicy: {{ $v.images.pullPolicy }}
      command: [cai, {{ .verb }}, -c, /etc/cai/run.yaml, --executor, kubernetes, --store, {{ include "cai.store" .ctx | quote }}]
      env:
        - {name: PYTHONUNBUFFERED, value: "1"}
        - {name: TOKENIZERS_PARALLELISM, value: "false"}
        - {name: CAI_CACHE_DIR, value: /var/cache/cai}
        - {name: HOME, value: /tmp}
        {{- with include "cai.storeEnv" .ctx }}
        {{- . | trim | nindent 8 }}
        {{- end }}
        - {name: HF_HOME, value: /var/cache/cai/hf}
        {{- with $v.hf.endpoint }}
        - {name: HF_ENDPOINT, value: {{ . | quote }}}
        {{- end }}
        {{- if $v.hf.tokenSecret }}
        - {name: HF_TOKEN_PATH, value: /var/run/secrets/cai/hf/token}
        {{- end }}
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        - name: POD_NAMESPACE
          valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $v.controller.resources | nindent 8 }}
      securityContext:
        {{- include "cai.containerSecurityContext" .ctx | nindent 8 }}
      volumeMounts:
        - {name: cache, mountPath: /var/cache/cai}
        - {name: tmp, mountPath: /tmp}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        - {name: config, mountPath: /etc/cai, readOnly: true}
        {{- if $v.hf.tokenSecret }}
        - {name: hf-token, mountPath: /var/run/secrets/cai/hf, readOnly: true}
        {{- end }}
  volumes:
    {{- if $v.modelCache.enabled }}
    - name: cache
      persistentVolumeClaim:
        claimName: {{ include "cai.modelCacheClaim" .ctx }}
    {{- else }}
    - {name: cache, emptyDir: {}}
    {{- end }}
    - {name: tmp, emptyDir: {}}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    - name: config
      configMap:
        name: {{ include "cai.configMapName" .ctx }}
    {{- with $v.hf.tokenSecret }}
    - name: hf-token
      secret:
        secretName: {{ . }}
        items: [{key: HF_TOKEN, path: token}]
        defaultMode: 0440
    {{- end }}
{{- end -}}

{{/*
Job spec fields shared by the install Job and the CronJob's jobTemplate: a controller that failed
(exit 1: a stage failed; exit 2: a config error) would fail the same way again, so only
infrastructure kills are retried, and evictions never count.
*/}}
{{- define "cai.controllerJobPolicy" -}}
backoffLimit: {{ .Values.controller.backoffLimit }}
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: controller
        operator: In
        values: [1, 2]
    - action: Ignore
      onPodConditions:
        - {type: DisruptionTarget, status: "True"}
{{- end -}}
