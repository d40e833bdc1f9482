{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "breakwater.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, prefixed to the chart name unless it already
contains it. Truncated to 63 characters.
*/}}
{{- define "breakwater.fullname" -}}
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
Chart label value: name-version.
*/}}
{{- define "breakwater.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "breakwater.labels" -}}
helm.sh/chart: {{ include "breakwater.chart" . }}
{{ include "breakwater.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: breakwater
{{- end }}

{{/*
Selector labels of the operator pods (immutable once installed).
*/}}
{{- define "breakwater.selectorLabels" -}}
app.kubernetes.io/name: {{ include "breakwater.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "breakwater.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "breakwater.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "breakwater.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
The root namespace: rootNamespace, or the release namespace when empty.
*/}}
{{- define "breakwater.rootNamespace" -}}
{{- .Values.rootNamespace | default .Release.Namespace }}
{{- end }}

{{/*
Name of the Secret the chart creates for redis.url.
*/}}
{{- define "breakwater.redisSecretName" -}}
{{- printf "%s-redis" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Sidecar injection: the ConfigMap with the injector's configuration and the
MutatingWebhookConfiguration (two kinds, one name).
*/}}
{{- define "breakwater.injectName" -}}
{{- printf "%s-inject" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The Service in front of every replica's webhook port.
*/}}
{{- define "breakwater.webhookServiceName" -}}
{{- printf "%s-webhook" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The names the webhook's serving certificate is issued for, comma-separated: the Service's
DNS names (the API server calls <service>.<namespace>.svc).
*/}}
{{- define "breakwater.webhookDNSNames" -}}
{{- $service := printf "%s.%s.svc" (include "breakwater.webhookServiceName" .) .Release.Namespace }}
{{- printf "%s,%s.cluster.local" $service $service }}
{{- end }}

{{/*
"true" when the operator manages the webhook's certificate itself (injection on, cert-manager
off); empty otherwise. Its RBAC is granted only then.
*/}}
{{- define "breakwater.webhookManagedCerts" -}}
{{- if and .Values.injection.enabled (not .Values.injection.certManager.enabled) }}true{{ end }}
{{- end }}

{{/*
The Secret the operator keeps the webhook's CA and certificate in (managed certificates).
*/}}
{{- define "breakwater.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
cert-manager mode: the Certificate, its Secret, and the self-signed Issuer (without issuerRef).
*/}}
{{- define "breakwater.webhookCertificateName" -}}
{{- printf "%s-webhook" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "breakwater.webhookCertificateSecretName" -}}
{{- printf "%s-webhook-cert" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "breakwater.selfSignedIssuerName" -}}
{{- printf "%s-selfsigned" (include "breakwater.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Namespaces never injected: the release namespace (the operator's own pods must not wait for
the webhook they serve), kube-system and kube-public. A YAML list.
*/}}
{{- define "breakwater.injectExcludedNamespaces" -}}
{{- toYaml (uniq (list .Release.Namespace "kube-system" "kube-public")) }}
{{- end }}

{{/*
Cross-value checks that a schema cannot express; included by the Deployment.
*/}}
{{- define "breakwater.validate" -}}
{{- if and (not .Values.leaderElection.enabled) (gt (int .Values.replicas) 1) }}
{{- fail (printf "leaderElection.enabled=false requires replicas: 1 (got %d): without leader election every replica would write status" (int .Values.replicas)) }}
{{- end }}
{{- if eq (int .Values.metrics.port) (int .Values.xds.port) }}
{{- fail (printf "metrics.port and xds.port must differ (both are %d): the metrics/health server and the xDS server cannot share a port" (int .Values.xds.port)) }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "set redis.url or redis.existingSecret, not both" }}
{{- end }}
{{- if and .Values.redis.existingSecret (not .Values.redis.existingSecretKey) }}
{{- fail "redis.existingSecretKey is required when redis.existingSecret is set" }}
{{- end }}
{{- if .Values.injection.enabled }}
{{- $port := int .Values.injection.port }}
{{- if or (eq $port (int .Values.metrics.port)) (eq $port (int .Values.xds.port)) }}
{{- fail (printf "injection.port must differ from metrics.port and xds.port (it is %d): the webhook has a server of its own" $port) }}
{{- end }}
{{- if and .Values.injection.certManager.issuerRef (not .Values.injection.certManager.issuerRef.name) }}
{{- fail "injection.certManager.issuerRef.name is required when issuerRef is set (leave issuerRef empty for a self-signed Issuer)" }}
{{- end }}
{{- end }}
{{- end }}
