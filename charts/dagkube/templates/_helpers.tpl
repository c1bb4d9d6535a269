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

{{/* "true" when the bundled Redis speaks TLS (redis.tls.enabled), else empty. Stops the
     render when TLS cannot work: no redis.tls.existingSecret, an external Redis (give it a
     rediss:// URL), or no worker users (worker Pods get the CA with their namespace's user). */}}
{{- define "dagkube.redisTls" -}}
{{- if .Values.redis.tls.enabled -}}
{{- if include "dagkube.redisExternal" . -}}
{{- fail "redis.tls.enabled=true is for the bundled Redis: with redis.external.url, give a rediss:// URL instead" -}}
{{- end -}}
{{- if not .Values.redis.tls.existingSecret -}}
{{- fail "redis.tls.enabled=true needs redis.tls.existingSecret: a Secret in the release namespace with the server certificate (tls.crt), its key (tls.key) and the CA (ca.crt), e.g. a cert-manager Certificate's" -}}
{{- end -}}
{{- if not .Values.redis.workerUsers -}}
{{- fail "redis.tls.enabled=true needs redis.workerUsers=true: worker Pods get the Redis CA in their namespace's dagkube-worker-redis Secret, which the operator makes with their Redis user" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* Where the bundled Redis and the operator mount the TLS Secret; the operator's CA is at
     <dir>/ca.crt, the path of dagkube.kubernetes.pods.REDIS_CA_FILE in worker Pods too. */}}
{{- define "dagkube.redisTlsDir" -}}
/etc/dagkube/redis-tls
{{- end -}}

{{/* The scheme of the bundled Redis' URLs: rediss with TLS. */}}
{{- define "dagkube.redisScheme" -}}
{{- ternary "rediss" "redis" (eq (include "dagkube.redisTls" .) "true") -}}
{{- end -}}

{{/* The Redis URL without its password: the external one, or the bundled Redis' Service. */}}
{{- define "dagkube.redisUrl" -}}
{{- if include "dagkube.redisExternal" . -}}
{{- .Values.redis.external.url -}}
{{- else -}}
{{- printf "%s://%s.%s.svc:6379/0" (include "dagkube.redisScheme" .) (include "dagkube.redisName" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the Redis passwords and the full URL (password included): the
     external one's, redis.auth.existingSecret, or the one the chart makes. */}}
{{- define "dagkube.redisSecretName" -}}
{{- if include "dagkube.redisExternal" . -}}
{{- required "redis.external.existingSecret is required when redis.external.url is set" .Values.redis.external.existingSecret -}}
{{- else -}}
{{- default (include "dagkube.redisName" .) .Values.redis.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The bundled Redis' default user's (admin) password: requirepass. */}}
{{- define "dagkube.redisPasswordKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}redis-password{{ end -}}
{{- end -}}

{{/* The password the operator logs in with: its own user's in the bundled Redis; in an
     external one, the password of redis.external.username (or of the URL's default user). */}}
{{- define "dagkube.redisOperatorPasswordKey" -}}
{{- if include "dagkube.redisExternal" . }}{{ .Values.redis.external.existingSecretPasswordKey }}
{{- else if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretOperatorPasswordKey }}
{{- else }}redis-operator-password{{ end -}}
{{- end -}}

{{/* The full URL with the default user's password: worker Pods read it without worker users. */}}
{{- define "dagkube.redisUrlKey" -}}
{{- if include "dagkube.redisExternal" . }}{{ .Values.redis.external.existingSecretUrlKey }}
{{- else if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretUrlKey }}
{{- else }}redis-url{{ end -}}
{{- end -}}

{{/* The Redis user of the operator in the bundled Redis (dagkube.store.acl.OPERATOR_USER). */}}
{{- define "dagkube.redisOperatorUser" -}}
dagkube-operator
{{- end -}}

{{/* The operator's Redis URL, without the password: its own user in the bundled Redis; in an
     external one redis.external.username, when set. */}}
{{- define "dagkube.redisOperatorUrl" -}}
{{- if include "dagkube.redisExternal" . -}}
{{- $url := .Values.redis.external.url -}}
{{- with .Values.redis.external.username -}}
{{- $url = regexReplaceAll "^(rediss?://)" $url (printf "${1}%s@" .) -}}
{{- end -}}
{{- $url -}}
{{- else -}}
{{- printf "%s://%s@%s.%s.svc:6379/0" (include "dagkube.redisScheme" .) (include "dagkube.redisOperatorUser" .) (include "dagkube.redisName" .) .Release.Namespace -}}
{{- if include "dagkube.redisTls" . -}}
{{- printf "?ssl_ca_certs=%s/ca.crt" (include "dagkube.redisTlsDir" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's permissions, shared by the Role and the ClusterRole. */}}
{{- define "dagkube.operatorRules" -}}
{{- /* Exactly what the operator calls (tests/k8s/test_operator.py compares): kopf watches and
       patches Workflows (finalizer, annotations), the operator patches their status and deletes
       them after ttlSecondsAfterFinished, manages worker Pods and their pools' ConfigMaps and
       posts Events.
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
# The tail of a failed build Pod's log, for the Workflow's message.
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- /* The ConfigMap standing for each shared worker pool (dagkube-worker-pool-<hash>), made on
       demand and read back for its uid: it owns the pool's Pods. */}}
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, get]
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
