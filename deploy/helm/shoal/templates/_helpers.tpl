{{/* Names, labels and the environment every Shoal container shares. */}}

{{- define "shoal.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "shoal.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "router") */}}
{{- define "shoal.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shoal.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "shoal.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-tokens" (include "shoal.fullname" .)) -}}
{{- end -}}

{{- define "shoal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (printf "%s-controller" (include "shoal.fullname" .)) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "shoal.workerPrefix" -}}
{{- printf "%s-worker-" (include "shoal.fullname" .) -}}
{{- end -}}

{{/* The chart's own Redis speaks TLS when internal TLS is on, with a certificate from the same CA (checked
against the Service's name by every client). */}}
{{- define "shoal.redisUrl" -}}
{{- if and .Values.redis.enabled .Values.tls.enabled -}}
{{- printf "rediss://%s-redis:6379/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/shoal-tls/ca.crt" (include "shoal.fullname" .) -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "shoal.fullname" .) -}}
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Environment of every Shoal container: cluster state, telemetry, the internal token.
(dict "root" $ "user" "worker"): with redis.serviceUsers, the container signs in to Redis as that user. */}}
{{- define "shoal.commonEnv" -}}
{{- $root := .root -}}
- name: SHOAL_ENV
  value: prod
- name: SHOAL_REDIS_URL
  value: {{ include "shoal.redisUrl" $root | quote }}
{{- if $root.Values.redis.serviceUsers }}
- name: SHOAL_REDIS_USERNAME
  value: {{ .user }}
{{- end }}
- name: SHOAL_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "shoal.secretName" $root }}
      key: {{ include "shoal.redisPasswordKey" . }}
- name: SHOAL_LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
- name: SHOAL_LOG_FORMAT
  value: json
{{- with $root.Values.otlpEndpoint }}
- name: SHOAL_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: SHOAL_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "shoal.secretName" $root }}
      key: internal-token
{{- if $root.Values.tls.enabled }}
- name: SHOAL_TLS_DIR
  value: /etc/shoal-tls
{{- else }}
- name: SHOAL_RPC_PLAINTEXT
  value: "true"
{{- end }}
{{- end -}}

{{/* The Secret key of a Redis user's password: (dict "root" $ "user" "worker"); without service users, the
default user's. */}}
{{- define "shoal.redisPasswordKey" -}}
{{- if .root.Values.redis.serviceUsers -}}
redis-password-{{ .user }}
{{- else -}}
redis-password
{{- end -}}
{{- end -}}

{{/* The Secret holding a service's certificate (ca.crt, tls.crt, tls.key): (dict "root" $ "role" "worker"). */}}
{{- define "shoal.tlsSecret" -}}
{{- $tls := .root.Values.tls -}}
{{- if eq $tls.source "existing" -}}
{{- required (printf "tls.existingSecrets.%s is required when tls.source is existing" .role) (index $tls.existingSecrets .role) -}}
{{- else -}}
{{- printf "%s-tls-%s" (include "shoal.fullname" .root) .role -}}
{{- end -}}
{{- end -}}

{{/* The mount and the volume of a service's certificate (SHOAL_TLS_DIR), when TLS is on. */}}
{{/* The DNS names of the chart's Redis (its certificate's), space-separated. */}}
{{- define "shoal.redisNames" -}}
{{- $service := printf "%s-redis" (include "shoal.fullname" .) -}}
{{- $service }} {{ $service }}.{{ .Release.Namespace }}.svc {{ $service }}.{{ .Release.Namespace }}.svc.cluster.local
{{- end -}}

{{- define "shoal.tlsMount" -}}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: /etc/shoal-tls, readOnly: true}
{{- end }}
{{- end -}}

{{- define "shoal.tlsVolume" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "shoal.tlsSecret" . }}
    defaultMode: 0440  # group-readable: the pod's fsGroup is the service's group
{{- end }}
{{- end -}}

{{/* The controller's settings, shared by the controller and its Celery worker. */}}
{{- define "shoal.controllerEnv" -}}
{{ include "shoal.commonEnv" (dict "root" . "user" "controller") }}
- name: SHOAL_CONTROLLER_HOST
  value: 0.0.0.0
- name: SHOAL_CONTROLLER_HTTP_PORT
  value: "8080"
- name: SHOAL_CONTROLLER_ADMIN_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ include "shoal.secretName" . }}
      key: admin-tokens
- name: SHOAL_CONTROLLER_ACTUATOR
  value: kubernetes
- name: SHOAL_CONTROLLER_KUBERNETES_NAMESPACE
  value: {{ .Release.Namespace | quote }}
- name: SHOAL_CONTROLLER_DEPLOYMENT_PREFIX
  value: {{ include "shoal.workerPrefix" . | quote }}
- name: SHOAL_CONTROLLER_RECONCILE_INTERVAL_S
  value: {{ .Values.controller.reconcileIntervalS | quote }}
- name: SHOAL_CONTROLLER_BOOTSTRAP
  value: /etc/shoal/bootstrap.yaml
- name: SHOAL_CONTROLLER_ROUTER_URL
  value: "http://{{ include "shoal.fullname" . }}-router:{{ .Values.router.service.port }}"
- name: SHOAL_CONTROLLER_ROUTER_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "shoal.secretName" . }}
      key: api-keys
{{- end -}}

{{/* Pod fields every Shoal pod shares. Only the controller and Celery pods get the actuator's account. */}}
{{- define "shoal.podDefaults" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A NetworkPolicy peer: one component's pods, or every worker (dict "root" $ "component" "router"). */}}
{{- define "shoal.peer" -}}
{{- if eq .component "worker" }}
podSelector:
  matchLabels:
    app.kubernetes.io/instance: {{ .root.Release.Name }}
  matchExpressions:
    - {key: shoal.io/pool, operator: Exists}
{{- else }}
podSelector:
  matchLabels:
    app.kubernetes.io/instance: {{ .root.Release.Name }}
    app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}
{{/* Egress every component needs: cluster DNS, and the trace collector when one is set. */}}
{{- define "shoal.egressCommon" -}}
# Cluster DNS.
- ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
{{- if .Values.otlpEndpoint }}
# The OpenTelemetry collector (otlpEndpoint).
- ports: [{port: {{ regexFind "[0-9]+$" (trimSuffix "/" .Values.otlpEndpoint) | default "4317" | int }}, protocol: TCP}]
{{- end }}
{{- end }}

{{/* Egress to Redis: the chart's own, or an external one (redis.externalUrl) on its port anywhere. */}}
{{- define "shoal.redisEgress" -}}
{{- if .Values.redis.enabled }}
- to:
    - {{- include "shoal.peer" (dict "root" . "component" "redis") | nindent 6 }}
  ports: [{port: 6379, protocol: TCP}]
{{- else }}
- ports: [{port: {{ regexFind ":[0-9]+" (trimPrefix "rediss://" (trimPrefix "redis://" .Values.redis.externalUrl)) | trimPrefix ":" | default "6379" | int }}, protocol: TCP}]
{{- end }}
{{- end -}}
