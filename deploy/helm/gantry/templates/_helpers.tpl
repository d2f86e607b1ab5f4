{{/* The chart's name, overridable. */}}
{{- define "gantry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A release-qualified name for the chart's objects, at most 63 characters. */}}
{{- define "gantry.fullname" -}}
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

{{- define "gantry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gantry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gantry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gantry.labels" -}}
helm.sh/chart: {{ include "gantry.chart" . }}
{{ include "gantry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The daemon's pods (selector labels plus the component). */}}
{{- define "gantry.daemonSelectorLabels" -}}
{{ include "gantry.selectorLabels" . }}
app.kubernetes.io/component: daemon
{{- end }}

{{- define "gantry.postgresqlSelectorLabels" -}}
{{ include "gantry.selectorLabels" . }}
app.kubernetes.io/component: postgresql
{{- end }}

{{- define "gantry.postgresqlName" -}}
{{- printf "%s-postgresql" (include "gantry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret holding the database URL: the operator's, else the chart's name for it (made by the
chart from database.url or for the bundled PostgreSQL, else expected from the operator). */}}
{{- define "gantry.databaseSecretName" -}}
{{- if and .Values.database.existingSecret (not .Values.postgresql.enabled) }}
{{- .Values.database.existingSecret }}
{{- else }}
{{- printf "%s-database" (include "gantry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "gantry.databaseSecretKey" -}}
{{- if and .Values.database.existingSecret (not .Values.postgresql.enabled) }}
{{- .Values.database.existingSecretKey }}
{{- else }}database-url{{- end }}
{{- end }}

{{/* Whether the chart makes the database Secret itself. */}}
{{- define "gantry.createsDatabaseSecret" -}}
{{- if or .Values.postgresql.enabled (and .Values.database.url (not .Values.database.existingSecret)) }}true{{- end }}
{{- end }}

{{- define "gantry.tokensSecretName" -}}
{{- if .Values.tokens.existingSecret }}
{{- .Values.tokens.existingSecret }}
{{- else }}
{{- printf "%s-tokens" (include "gantry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "gantry.tokensSecretKey" -}}
{{- if .Values.tokens.existingSecret }}{{ .Values.tokens.existingSecretKey }}{{- else }}tokens.toml{{- end }}
{{- end }}

{{- define "gantry.runsClaimName" -}}
{{- if .Values.storage.existingClaim }}
{{- .Values.storage.existingClaim }}
{{- else }}
{{- printf "%s-runs" (include "gantry.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* --devices: as given, else every GPU the pod was granted, else one CPU slot. */}}
{{- define "gantry.devices" -}}
{{- if .Values.devices }}
{{- .Values.devices }}
{{- else if gt (int .Values.gpu.count) 0 }}
{{- $ids := list }}
{{- range $i := until (int .Values.gpu.count) }}
{{- $ids = append $ids (toString $i) }}
{{- end }}
{{- printf "cuda:%s" (join "," $ids) }}
{{- else }}cpu:1{{- end }}
{{- end }}

{{/* http or https, for the probes and the ServiceMonitor. */}}
{{- define "gantry.scheme" -}}
{{- if .Values.tls.existingSecret }}HTTPS{{- else }}HTTP{{- end }}
{{- end }}

{{/* host:port for a listener on the bind address. */}}
{{- define "gantry.listen" -}}
{{- printf "%s:%d" .root.Values.daemon.bindAddress (int .port) }}
{{- end }}
