{{/*
The chart name, or nameOverride.
*/}}
{{- define "kubelora.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A fully qualified name for the release's objects, at most 63 characters (some Kubernetes name
fields are limited to a DNS label). A release named like the chart is not repeated.
*/}}
{{- define "kubelora.fullname" -}}
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

{{/*
The chart label value: name-version.
*/}}
{{- define "kubelora.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The namespace of the release's own objects.
*/}}
{{- define "kubelora.namespace" -}}
{{- .Release.Namespace }}
{{- end }}

{{/*
Labels every object of the release carries, without a component. The chart's own labels win over
global.commonLabels, so that selectors keep matching.
*/}}
{{- define "kubelora.commonLabels" -}}
{{- $labels := dict
  "helm.sh/chart" (include "kubelora.chart" .)
  "app.kubernetes.io/name" (include "kubelora.name" .)
  "app.kubernetes.io/instance" .Release.Name
  "app.kubernetes.io/managed-by" .Release.Service
  "app.kubernetes.io/part-of" "kubelora"
}}
{{- if .Chart.AppVersion }}
{{- $_ := set $labels "app.kubernetes.io/version" .Chart.AppVersion }}
{{- end }}
{{- toYaml (merge $labels (deepCopy .Values.global.commonLabels)) }}
{{- end }}

{{/*
Labels of the operator's objects.
*/}}
{{- define "kubelora.labels" -}}
{{- $labels := include "kubelora.commonLabels" . | fromYaml }}
{{- $_ := set $labels "app.kubernetes.io/component" "operator" }}
{{- toYaml $labels }}
{{- end }}

{{/*
Labels the operator's Deployment selects its pods by; never change them on upgrade.
*/}}
{{- define "kubelora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubelora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "kubelora.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubelora.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: the digest wins over the tag, and the tag
defaults to the chart's appVersion. Call with (dict "image" .Values.image "context" $).
*/}}
{{- define "kubelora.image" -}}
{{- $tag := default .context.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when the operator watches every namespace.
*/}}
{{- define "kubelora.clusterScoped" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The name of kopf's peering object (ClusterKopfPeering, or KopfPeering in each watched namespace).
*/}}
{{- define "kubelora.peeringName" -}}
{{- default (include "kubelora.fullname" .) .Values.peering.name }}
{{- end }}

{{/*
MinIO's names and labels.
*/}}
{{- define "kubelora.minio.fullname" -}}
{{- printf "%s-minio" (include "kubelora.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubelora.minio.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubelora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: minio
{{- end }}

{{- define "kubelora.minio.labels" -}}
{{- $labels := include "kubelora.commonLabels" . | fromYaml }}
{{- $_ := set $labels "app.kubernetes.io/component" "minio" }}
{{- toYaml $labels }}
{{- end }}

{{- define "kubelora.minio.secretName" -}}
{{- default (include "kubelora.minio.fullname" .) .Values.minio.existingSecret }}
{{- end }}

{{/*
The S3 endpoint the operator and the trainers use by default: the chart's MinIO, or s3.endpoint.
*/}}
{{- define "kubelora.s3Endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "%s.%s.svc:%d" (include "kubelora.minio.fullname" .) (include "kubelora.namespace" .) (int .Values.minio.service.port) }}
{{- else }}
{{- .Values.s3.endpoint }}
{{- end }}
{{- end }}

{{/*
"true" when the S3 endpoint needs TLS: s3.secure, or an https:// endpoint. The chart's MinIO has none.
*/}}
{{- define "kubelora.s3Secure" -}}
{{- if and (not .Values.minio.enabled) (or .Values.s3.secure (hasPrefix "https://" .Values.s3.endpoint)) }}true{{ else }}false{{ end }}
{{- end }}

{{/*
The Secret (keys accessKey and secretKey) holding the operator's S3 credentials, or empty.
*/}}
{{- define "kubelora.s3SecretName" -}}
{{- if .Values.minio.enabled }}
{{- include "kubelora.minio.secretName" . }}
{{- else }}
{{- .Values.s3.existingSecret }}
{{- end }}
{{- end }}

{{/*
Checks that span several values, which the JSON schema cannot express.
*/}}
{{- define "kubelora.validate" -}}
{{- if and .Values.minio.enabled .Values.s3.endpoint }}
{{- fail "Set either s3.endpoint (an existing S3 service) or minio.enabled=true (the chart's MinIO), not both" }}
{{- end }}
{{- if and .Values.minio.enabled .Values.s3.existingSecret }}
{{- fail "s3.existingSecret is for s3.endpoint; with minio.enabled=true use minio.existingSecret" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) }}
{{- fail "replicaCount > 1 needs peering.enabled=true, or several operators would handle the same objects" }}
{{- end }}
{{- end }}
