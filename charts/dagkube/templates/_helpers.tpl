{{/* The chart name, overridable. */}}
{{- define "dagkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every resource name: <release>-<chart>, or the release alone when it
     already contains the chart name. */}}
{{- define "dagkube.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "dagkube.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component. Call with (dict "ctx" $ "component" "operator"). */}}
{{- define "dagkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dagkube.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every label of one component. Call with (dict "ctx" $ "component" "operator"). */}}
{{- define "dagkube.labels" -}}
{{ include "dagkube.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: dagkube
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "dagkube.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dagkube.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "repository:tag" with the appVersion as the default tag; the repository is required (the
     images are built by the user, not published). Call with
     (dict "ctx" $ "image" ... "key" "operator.image"). */}}
{{- define "dagkube.image" -}}
{{- $message := printf "%s.repository is not set: dagkube's images are not published. Build them (make images, with docker or podman), push or load them into your cluster, then install with --set operator.image.repository=<registry>/dagkube/operator --set worker.image.repository=<registry>/dagkube/worker (see docs/kubernetes.md)" .key -}}
{{- printf "%s:%s" (required $message .image.repository) (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "dagkube.redisExternal" -}}
{{- if .Values.redis.external.url }}true{{ end -}}
{{- end -}}

{{/* The Service (and StatefulSet) name of the bundled Redis. */}}
{{- define "dagkube.redisName" -}}
{{- printf "%s-redis" (include "dagkube.fullname" .) -}}
{{- end -}}

{{/* The Redis URL without its password: the external one, or the bundled Redis' Service. */}}
{{- define "dagkube.redisUrl" -}}
{{- if include "dagkube.redisExternal" . -}}
{{- .Values.redis.external.url -}}
{{- else -}}
{{- printf "redis://%s.%s.svc:6379/0" (include "dagkube.redisName" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the Redis password and the full URL (password included). */}}
{{- define "dagkube.redisSecretName" -}}
{{- if include "dagkube.redisExternal" . -}}
{{- required "redis.external.existingSecret is required when redis.external.url is set" .Values.redis.external.existingSecret -}}
{{- else -}}
{{- include "dagkube.redisName" . -}}
{{- end -}}
{{- end -}}

{{- define "dagkube.redisPasswordKey" -}}
{{- if include "dagkube.redisExternal" . }}{{ .Values.redis.external.existingSecretPasswordKey }}{{ else }}redis-password{{ end -}}
{{- end -}}

{{- define "dagkube.redisUrlKey" -}}
{{- if include "dagkube.redisExternal" . }}{{ .Values.redis.external.existingSecretUrlKey }}{{ else }}redis-url{{ end -}}
{{- end -}}

{{/* The operator's permissions, shared by the Role and the ClusterRole. */}}
{{- define "dagkube.operatorRules" -}}
{{- /* Exactly what the operator calls (tests/k8s/test_operator.py compares): kopf watches and
       patches Workflows (finalizer, annotations), the operator patches their status and deletes
       them after ttlSecondsAfterFinished, manages worker Pods and posts Events.
       workflows/finalizers update: admission (OwnerReferencesPermissionEnforcement) requires it
       to set blockOwnerDeletion on the Pods a Workflow owns. */ -}}
- apiGroups: [dagkube.io]
  resources: [workflows]
  verbs: [list, watch, patch, delete]
- apiGroups: [dagkube.io]
  resources: [workflows/status]
  verbs: [patch]
- apiGroups: [dagkube.io]
  resources: [workflows/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [create, get, list, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if .Values.redis.workerUsers }}
{{- /* Each namespace's worker Redis user: its URL in a Secret the operator makes there once
       and reads back (only that name; create cannot be limited to a name). */}}
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [dagkube-worker-redis]
  verbs: [get]
{{- end }}
{{- if .Values.operator.peering.enabled }}
{{- /* kopf peering: each replica lists and watches the peering object and patches its own
       keep-alive into it. */}}
- apiGroups: [kopf.dev]
  resources: [{{ ternary "clusterkopfpeerings" "kopfpeerings" .Values.rbac.clusterWide }}]
  verbs: [list, watch, patch]
{{- end }}
{{- end -}}

{{- define "dagkube.peeringName" -}}
{{- if .Values.rbac.clusterWide -}}
{{- printf "%s-%s" .Release.Namespace (include "dagkube.fullname" .) | trunc 253 -}}
{{- else -}}
{{- include "dagkube.fullname" . -}}
{{- end -}}
{{- end -}}
