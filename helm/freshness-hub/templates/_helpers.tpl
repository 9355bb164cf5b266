{{/*
Chart name, overridable.
*/}}
{{- define "freshness-hub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects, at most 63 characters (DNS label).
*/}}
{{- define "freshness-hub.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "freshness-hub.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the hub's pods; never change them on upgrade.
*/}}
{{- define "freshness-hub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "freshness-hub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "freshness-hub.labels" -}}
helm.sh/chart: {{ include "freshness-hub.chart" . }}
{{ include "freshness-hub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: hub
app.kubernetes.io/part-of: freshness
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "freshness-hub.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Where the ConfigMap is mounted in the container.
*/}}
{{- define "freshness-hub.configDir" -}}
/etc/freshness
{{- end }}

{{/* Where the TLS Secret and the auth files are mounted. */}}
{{- define "freshness-hub.tlsDir" -}}
/etc/freshness-tls
{{- end }}
{{- define "freshness-hub.authDir" -}}
/etc/freshness-auth
{{- end }}

{{/*
The TLS Secret the hub serves with: tls.secretName, else the one the chart's
cert-manager Certificate fills; empty without TLS.
*/}}
{{- define "freshness-hub.tlsSecret" -}}
{{- if .Values.tls.secretName }}
{{- .Values.tls.secretName }}
{{- else if .Values.tls.certManager.enabled }}
{{- include "freshness-hub.fullname" . }}-tls
{{- end }}
{{- end }}

{{/* "true" when callers must authenticate (a token file, a JWKS or client certificates). */}}
{{- define "freshness-hub.authSource" -}}
{{- if or .Values.auth.tokensSecret .Values.auth.jwksSecret .Values.tls.clientAuth }}true{{ end }}
{{- end }}

{{/* Where the durable log lives in the container (the data volume). */}}
{{- define "freshness-hub.dataDir" -}}
/var/lib/freshness
{{- end }}

{{/*
The hub's freshness.toml. Keys are the hub's own (snake_case); the hub rejects
unknown keys, so add one here only when the hub knows it. Strings go through
toJson: a JSON string is a valid TOML basic string. Numbers go through int64
because Helm reads every YAML number as a float.
*/}}
{{- define "freshness-hub.config" -}}
{{- $hub := .Values.hub -}}
{{- /* Checks across values that the schema cannot express; the hub would refuse to start. */}}
{{- if hasKey $hub.peers $hub.region }}
{{- fail (printf "hub.peers lists %q, which is this hub's own region (hub.region)" $hub.region) }}
{{- end }}
{{- if and .Values.jetstream.enabled $hub.hubId }}
{{- fail "hub.hubId must be empty with jetstream.enabled: every replica needs its own id (its pod name) to share acks and hold the region's link lease" }}
{{- end }}
{{- if and .Values.jetstream.enabled (not .Values.jetstream.secretName) }}
{{- fail "jetstream.secretName must name the Secret with the NATS URL when jetstream.enabled" }}
{{- end }}
{{- if lt (int64 $hub.log.maxEvents) (int64 $hub.shards) }}
{{- fail "hub.log.maxEvents must be at least hub.shards (one event per shard)" }}
{{- end }}
{{- if lt (div (int64 $hub.log.maxBytes) (int64 $hub.shards)) 66560 }}
{{- fail "hub.log.maxBytes must leave room for one maximal event (65 KiB) per shard" }}
{{- end }}
{{- if lt (int64 $hub.log.memoryMaxEvents) (int64 $hub.shards) }}
{{- fail "hub.log.memoryMaxEvents must be at least hub.shards (one event per shard)" }}
{{- end }}
{{- if lt (div (int64 $hub.log.memoryMaxBytes) (int64 $hub.shards)) 66560 }}
{{- fail "hub.log.memoryMaxBytes must leave room for one maximal event (65 KiB) per shard" }}
{{- end }}
{{- $tls := include "freshness-hub.tlsSecret" . }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.secretName) (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name" }}
{{- end }}
{{- if and .Values.tls.clientAuth (not $tls) }}
{{- fail "tls.clientAuth needs TLS: tls.secretName or tls.certManager.enabled" }}
{{- end }}
{{- range $region, $url := $hub.peers }}
{{- if and (hasPrefix "https://" $url) (not $tls) }}
{{- fail (printf "hub.peers.%s is https://: its CA is the TLS Secret's ca.crt, so TLS must be set (tls.secretName or tls.certManager.enabled)" $region) }}
{{- end }}
{{- end }}
{{- if not (or .Values.insecure (and $tls (include "freshness-hub.authSource" .))) }}
{{- fail "the hub listens on 0.0.0.0 and needs TLS (tls.secretName or tls.certManager.enabled) and an auth source (auth.tokensSecret, auth.jwksSecret or tls.clientAuth); or set insecure: true" }}
{{- end -}}
# Rendered by the freshness-hub chart from its values; edit those instead.
listen = "0.0.0.0:50051"
metrics_listen = "0.0.0.0:9464"
region = {{ $hub.region | toJson }}
{{- with $hub.hubId }}
hub_id = {{ . | toJson }}
{{- end }}
shards = {{ int64 $hub.shards }}
progress_interval = {{ $hub.progressInterval | toJson }}
shutdown_grace = {{ $hub.shutdownGrace | toJson }}
log_format = {{ $hub.logFormat | toJson }}
log_max_events = {{ int64 $hub.log.maxEvents }}
log_max_bytes = {{ int64 $hub.log.maxBytes }}
memory_max_events = {{ int64 $hub.log.memoryMaxEvents }}
memory_max_bytes = {{ int64 $hub.log.memoryMaxBytes }}
fsync = {{ $hub.log.fsync | toJson }}
{{- with $hub.log.fsyncInterval }}
fsync_interval = {{ . | toJson }}
{{- end }}
max_in_flight = {{ int64 $hub.limits.maxInFlight }}
max_events_per_publish = {{ int64 $hub.limits.maxEventsPerPublish }}
max_payload_bytes = {{ int64 $hub.limits.maxPayloadBytes }}
max_message_bytes = {{ int64 $hub.limits.maxMessageBytes }}
{{- with $hub.limits.maxNodes }}
max_nodes = {{ int64 . }}
{{- end }}
{{- with $hub.limits.maxAckWaiters }}
max_ack_waiters = {{ int64 . }}
{{- end }}
{{- with $hub.limits.shardQueue }}
shard_queue = {{ int64 . }}
{{- end }}
{{- with $hub.limits.shardActors }}
shard_actors = {{ int64 . }}
{{- end }}
{{- with $hub.limits.admissionTimeout }}
admission_timeout = {{ . | toJson }}
{{- end }}
{{- if $tls }}
tls_cert = "{{ include "freshness-hub.tlsDir" . }}/tls.crt"
tls_key = "{{ include "freshness-hub.tlsDir" . }}/tls.key"
peer_ca = "{{ include "freshness-hub.tlsDir" . }}/ca.crt"
{{- if .Values.tls.clientAuth }}
tls_client_ca = "{{ include "freshness-hub.tlsDir" . }}/ca.crt"
{{- end }}
{{- end }}
{{- if .Values.auth.policy }}
auth_policy = "{{ include "freshness-hub.authDir" . }}/policy/policy.yaml"
{{- end }}
{{- if .Values.auth.tokensSecret }}
auth_tokens = "{{ include "freshness-hub.authDir" . }}/tokens/tokens"
{{- end }}
{{- if .Values.auth.jwksSecret }}
auth_jwks = "{{ include "freshness-hub.authDir" . }}/jwks/jwks.json"
auth_audience = {{ .Values.auth.audience | toJson }}
{{- end }}
{{- if .Values.insecure }}
insecure = true
{{- end }}
{{- if .Values.jetstream.enabled }}
# The region's log is a NATS JetStream stream; nats_url comes from the
# Secret (FRESHNESS_NATS_URL).
log = "jetstream"
jetstream_replicas = {{ int64 .Values.jetstream.streamReplicas }}
{{- end }}
{{- with $hub.peers }}

[peers]
{{- range $region, $url := . }}
{{ $region | toJson }} = {{ $url | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The relay's pods: their own selector, so that the hub's Service and PDB never
select them.
*/}}
{{- define "freshness-hub.relaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "freshness-hub.name" . }}-relay
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "freshness-hub.relayLabels" -}}
helm.sh/chart: {{ include "freshness-hub.chart" . }}
{{ include "freshness-hub.relaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: relay
app.kubernetes.io/part-of: freshness
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The probes: native gRPC ones on plain text; with TLS the port is probed, as
the kubelet's gRPC probe speaks only plain text. Shared by the StatefulSet
and the JetStream Deployment.
*/}}
{{- define "freshness-hub.probes" -}}
{{- if include "freshness-hub.tlsSecret" . }}
# The kubelet's gRPC probe speaks only plain text: with TLS, the
# port is probed.
livenessProbe:
  tcpSocket:
    port: 50051
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  tcpSocket:
    port: 50051
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- else }}
livenessProbe:
  grpc:
    port: 50051
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  grpc:
    port: 50051
    service: freshness.v1.Hub
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The TLS and auth files' mounts and volumes (certificate, key and CA; the
policy; the token file; the JWKS), reloaded by the hub when they change.
*/}}
{{- define "freshness-hub.securityMounts" -}}
{{- if include "freshness-hub.tlsSecret" . }}
# Certificate, key and CA; the hub reloads them when the Secret
# is updated (cert-manager's renewals).
- name: tls
  mountPath: {{ include "freshness-hub.tlsDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.auth.policy }}
- name: policy
  mountPath: {{ include "freshness-hub.authDir" . }}/policy
  readOnly: true
{{- end }}
{{- if .Values.auth.tokensSecret }}
- name: tokens
  mountPath: {{ include "freshness-hub.authDir" . }}/tokens
  readOnly: true
{{- end }}
{{- if .Values.auth.jwksSecret }}
- name: jwks
  mountPath: {{ include "freshness-hub.authDir" . }}/jwks
  readOnly: true
{{- end }}
{{- end }}

{{- define "freshness-hub.securityVolumes" -}}
{{- with include "freshness-hub.tlsSecret" . }}
- name: tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- if .Values.auth.policy }}
- name: policy
  configMap:
    name: {{ include "freshness-hub.fullname" . }}-policy
{{- end }}
{{- with .Values.auth.tokensSecret }}
- name: tokens
  secret:
    secretName: {{ . }}
    items:
      - key: tokens
        path: tokens
{{- end }}
{{- with .Values.auth.jwksSecret }}
- name: jwks
  secret:
    secretName: {{ . }}
    items:
      - key: jwks.json
        path: jwks.json
{{- end }}
{{- end }}
