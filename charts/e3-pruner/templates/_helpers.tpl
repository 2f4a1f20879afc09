{{/* Chart name, at most 63 characters. */}}
{{- define "e3-pruner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource. Truncated so that the longest suffix the chart appends
("-scheduler", "-mlflow") still fits the 63-character limit of DNS labels.
*/}}
{{- define "e3-pruner.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* helm.sh/chart label value. */}}
{{- define "e3-pruner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels; include with a component: (dict "ctx" $ "component" "mlflow"). */}}
{{- define "e3-pruner.labels" -}}
helm.sh/chart: {{ include "e3-pruner.chart" .ctx }}
{{ include "e3-pruner.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: e3-pruner
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels (immutable on a Deployment: never add the version here). */}}
{{- define "e3-pruner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "e3-pruner.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* ServiceAccount of the schedule Jobs. */}}
{{- define "e3-pruner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-scheduler" (include "e3-pruner.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the MLflow server. */}}
{{- define "e3-pruner.mlflow.serviceAccountName" -}}
{{- if .Values.mlflow.serviceAccount.create }}
{{- default (printf "%s-mlflow" (include "e3-pruner.fullname" .)) .Values.mlflow.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.mlflow.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "e3-pruner.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "e3-pruner.fullname" .) }}
{{- end }}

{{/* In-cluster URL of the MLflow server, reachable from any namespace. */}}
{{- define "e3-pruner.mlflow.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc.%s:%v" (include "e3-pruner.mlflow.fullname" .) .Release.Namespace .Values.clusterDomain .Values.mlflow.service.port }}
{{- else }}
{{- required "mlflow.externalTrackingUri is required when mlflow.enabled is false" .Values.mlflow.externalTrackingUri }}
{{- end }}
{{- end }}

{{/*
Host headers the MLflow server accepts (--allowed-hosts). Passing the flag replaces MLflow's
default (localhost and private IPs), so that default is repeated here, then every name of the
Service, then mlflow.allowedHosts.
*/}}
{{- define "e3-pruner.mlflow.allowedHosts" -}}
{{- $svc := include "e3-pruner.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*" "[::1]" "[[]::1]:*" "10.*" "192.168.*" }}
{{- range $i := untilStep 16 32 1 }}
{{- $hosts = append $hosts (printf "172.%d.*" $i) }}
{{- end }}
{{- range $name := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.clusterDomain) }}
{{- $hosts = append $hosts $name }}
{{- $hosts = append $hosts (printf "%s:*" $name) }}
{{- end }}
{{- $hosts = concat $hosts .Values.mlflow.allowedHosts }}
{{- join "," $hosts }}
{{- end }}

{{/* Image of the schedule Jobs. */}}
{{- define "e3-pruner.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}

{{/* S3 environment shared by the MLflow server and the schedule Jobs. */}}
{{- define "e3-pruner.s3Env" -}}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Database environment of the MLflow containers: MLFLOW_BACKEND_STORE_URI, either read whole from
the Secret or composed from values with the password (and user) taken from the Secret through
Kubernetes' $(VAR) expansion, so the pod spec never holds a credential.
*/}}
{{- define "e3-pruner.mlflow.dbEnv" -}}
{{- $db := .Values.mlflow.database }}
{{- if not $db.host }}
- name: MLFLOW_BACKEND_STORE_URI
  valueFrom:
    secretKeyRef:
      name: {{ $db.existingSecret }}
      key: {{ required "mlflow.database: set host (and passwordKey) or uriKey" $db.uriKey }}
{{- else }}
{{- $defaultDriver := dict "postgresql" "psycopg2" "mysql" "pymysql" }}
{{- $defaultPort := dict "postgresql" 5432 "mysql" 3306 }}
{{- $driver := default (get $defaultDriver $db.dialect) $db.driver }}
{{- $port := $db.port | default (get $defaultPort $db.dialect) }}
{{- $user := $db.user }}
{{- if $db.userKey }}
- name: MLFLOW_DB_USER
  valueFrom:
    secretKeyRef:
      name: {{ $db.existingSecret }}
      key: {{ $db.userKey }}
{{- $user = "$(MLFLOW_DB_USER)" }}
{{- end }}
- name: MLFLOW_DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $db.existingSecret }}
      key: {{ $db.passwordKey }}
{{- $query := list }}
{{- range $k, $v := $db.options }}
{{- $query = append $query (printf "%s=%v" $k $v) }}
{{- end }}
- name: MLFLOW_BACKEND_STORE_URI
  value: {{ printf "%s+%s://%s:$(MLFLOW_DB_PASSWORD)@%s:%v/%s%s" $db.dialect $driver $user $db.host $port $db.name (ternary (printf "?%s" (join "&" $query)) "" (gt (len $query) 0)) | quote }}
{{- end }}
{{- end }}

{{/* The schedule entries with the defaults merged in, as a list of dicts (JSON-encoded). */}}
{{- define "e3-pruner.schedules" -}}
{{- $out := list }}
{{- $seen := dict }}
{{- range $s := .Values.schedules }}
{{- if hasKey $seen $s.name }}
{{- fail (printf "schedules: the name %q is used twice; each recurring run needs its own name" $s.name) }}
{{- end }}
{{- $_ := set $seen $s.name true }}
{{- $cfg := dict "host" $.Values.kfp.host }}
{{- with $.Values.kfp.namespace }}
{{- $_ := set $cfg "namespace" . }}
{{- end }}
{{- /* key by key with set, not mergeOverwrite: that would skip false and 0 (catchup: false) */}}
{{- /* Only fresh dicts are written to, so .Values is never modified and no deepCopy is needed
       (deepCopy fails on null values). */}}
{{- range $k, $v := $.Values.scheduleDefaults }}
{{- $_ := set $cfg $k $v }}
{{- end }}
{{- range $k, $v := $s }}
{{- $_ := set $cfg $k $v }}
{{- end }}
{{- /* A null parameter in a schedule removes a default one: the pipeline's own default applies. */}}
{{- $params := dict }}
{{- range $k, $v := ($.Values.scheduleDefaults.parameters | default dict) }}
{{- if not (kindIs "invalid" $v) }}
{{- $_ := set $params $k $v }}
{{- end }}
{{- end }}
{{- range $k, $v := ($s.parameters | default dict) }}
{{- if kindIs "invalid" $v }}
{{- $_ := unset $params $k }}
{{- else }}
{{- $_ := set $params $k $v }}
{{- end }}
{{- end }}
{{- with $.Values.job.trackingUriParameter }}
{{- if not (hasKey $params .) }}
{{- $_ := set $params . (include "e3-pruner.mlflow.trackingUri" $) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "parameters" $params }}
{{- $out = append $out $cfg }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Name of the schedule Job for one entry: (dict "ctx" $ "name" NAME "checksum" SUM). */}}
{{- define "e3-pruner.jobName" -}}
{{- $base := printf "%s-%s" (include "e3-pruner.fullname" .ctx | trunc 30 | trimSuffix "-") .name | trunc 54 | trimSuffix "-" }}
{{- if .ctx.Values.job.useHooks }}
{{- $base }}
{{- else }}
{{- printf "%s-%s" $base (.checksum | trunc 8) }}
{{- end }}
{{- end }}

{{/*
Namespace where the pipeline's steps run and read the ConfigMap e3-pruner-env and the Secret
e3-pruner-s3: pipelineEnv.namespace, else kfp.namespace (the profile namespace), else the
release namespace.
*/}}
{{- define "e3-pruner.pipelineEnv.namespace" -}}
{{- .Values.pipelineEnv.namespace | default .Values.kfp.namespace | default .Release.Namespace }}
{{- end }}
