{{- define "freshness-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "freshness-agent.fullname" -}}
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

{{- define "freshness-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "freshness-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "freshness-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "freshness-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: redis-agent
app.kubernetes.io/part-of: freshness
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "freshness-agent.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The agent's agent.toml. Keys are the agent's own (snake_case); it rejects
unknown keys. Strings go through toJson (a JSON string is a TOML basic
string); numbers through int64 (Helm reads YAML numbers as floats).
*/}}
{{- define "freshness-agent.config" -}}
{{- $a := .Values.agent -}}
{{- range $ns, $templates := $a.map }}
{{- range $templates }}
{{- if not (contains "{id}" .) }}
{{- fail (printf "agent.map.%s: template %q has no {id}" $ns .) }}
{{- end }}
{{- end }}
{{- end -}}
{{- if and (or .Values.tls.caSecret .Values.tls.clientSecret) (not (hasPrefix "https://" $a.hub)) }}
{{- fail (printf "tls.caSecret and tls.clientSecret need an https:// agent.hub, not %q" $a.hub) }}
{{- end -}}
# Rendered by the freshness-agent chart from its values; edit those instead.
hub = {{ $a.hub | toJson }}
redis = {{ $a.redis | toJson }}
node_id = {{ $a.nodeId | default (include "freshness-agent.fullname" .) | toJson }}
shards = {{ int64 $a.shards }}
tombstone_ttl = {{ $a.tombstoneTtl | toJson }}
feed_interval = {{ $a.feedInterval | toJson }}
persist_interval = {{ $a.persistInterval | toJson }}
max_batch = {{ int64 $a.maxBatch }}
metrics_listen = "0.0.0.0:9465"
namespaces = {{ $a.namespaces | toJson }}
{{- if .Values.tls.caSecret }}
ca = "/etc/freshness-agent/ca/ca.crt"
{{- end }}
{{- if .Values.tls.clientSecret }}
cert = "/etc/freshness-agent/client/tls.crt"
key = "/etc/freshness-agent/client/tls.key"
{{- end }}
{{- if .Values.token.secretName }}
token_file = "/etc/freshness-agent/token/token"
{{- end }}

[map]
{{- range $ns, $templates := $a.map }}
{{ $ns | toJson }} = {{ $templates | toJson }}
{{- end }}

[fail_closed]
{{- range $ns, $bound := $a.failClosed }}
{{ $ns | toJson }} = {{ $bound | toJson }}
{{- end }}
{{- end }}
