{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "cdc-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, plus the chart name unless it already contains it. */}}
{{- define "cdc-bridge.fullname" -}}
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

{{- define "cdc-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cdc-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cdc-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cdc-bridge.labels" -}}
helm.sh/chart: {{ include "cdc-bridge.chart" . }}
{{ include "cdc-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: cdc
{{- end }}

{{- define "cdc-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cdc-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret mounted as files: existingSecret, or the one this chart renders from .Values.secrets. */}}
{{- define "cdc-bridge.secretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- include "cdc-bridge.fullname" . }}
{{- end }}
{{- end }}

{{- define "cdc-bridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The bridge's HTTP port (metrics, /livez, /readyz): config.metrics.port. */}}
{{- define "cdc-bridge.metricsPort" -}}
{{- .Values.config.metrics.port | default 9187 | int }}
{{- end }}

{{/* The config file as rendered into the ConfigMap (also hashed into checksum/config). */}}
{{- define "cdc-bridge.configYaml" -}}
{{- toYaml .Values.config }}
{{- end }}

{{/* Labels of the verify CronJob and its pods: deliberately not the Deployment's
selector labels (its Service, PodDisruptionBudget and NetworkPolicy select by those). */}}
{{- define "cdc-bridge.verifyLabels" -}}
helm.sh/chart: {{ include "cdc-bridge.chart" . }}
app.kubernetes.io/name: {{ printf "%s-verify" (include "cdc-bridge.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: verify
{{- end }}
