{{/*
The chart name, or nameOverride.
*/}}
{{- define "s3grant.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, else "<release>-<chart>", or just the
release name when it already contains the chart name. 63 characters at most (DNS label).
*/}}
{{- define "s3grant.fullname" -}}
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
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "s3grant.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "s3grant.labels" -}}
helm.sh/chart: {{ include "s3grant.chart" . }}
{{ include "s3grant.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: s3grant
{{- end }}

{{/*
Labels the Deployment, Service and ServiceMonitor select on. Never change them in an
upgrade: a Deployment's selector is immutable.
*/}}
{{- define "s3grant.selectorLabels" -}}
app.kubernetes.io/name: {{ include "s3grant.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "s3grant.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "s3grant.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest when a digest is given, else repository:tag
(tag defaulting to the chart's appVersion).
*/}}
{{- define "s3grant.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The namespace of the leader-election Lease: leaderElection.namespace or the release's.
*/}}
{{- define "s3grant.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace }}
{{- end }}

{{/*
Fails the render on combinations the schema cannot express. Included by the Deployment.
*/}}
{{- define "s3grant.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "replicaCount is %d but leaderElection.enabled is false: several replicas without leader election would all reconcile the same grants (racing on IAM keys). Set leaderElection.enabled=true or replicaCount=1." (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.service.enabled) }}
{{- fail "serviceMonitor.enabled needs service.enabled: the ServiceMonitor scrapes the Service's metrics port." }}
{{- end }}
{{- if and .Values.defaultClass.enabled (empty .Values.defaultClass.buckets) }}
{{- fail "defaultClass.enabled needs defaultClass.buckets: a class covers at least one bucket." }}
{{- end }}
{{- end }}
