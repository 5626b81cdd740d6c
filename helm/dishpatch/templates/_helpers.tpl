{{- define "dishpatch.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "dishpatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: dishpatch
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "c" "operator") */}}
{{- define "dishpatch.selector" -}}
app.kubernetes.io/name: dishpatch
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .c }}
{{- end -}}

{{- define "dishpatch.image" -}}
{{ .root.Values.image.prefix }}/{{ .c }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{/* restricted Pod Security: pod level */}}
{{- define "dishpatch.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* restricted Pod Security: container level */}}
{{- define "dishpatch.containerSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "dishpatch.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: admin}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: admin}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
startupProbe:
  httpGet: {path: /healthz, port: admin}
  periodSeconds: 2
  failureThreshold: 60
{{- end -}}

{{- define "dishpatch.amqpSecretName" -}}
{{- if .Values.rabbitmq.external.enabled -}}{{ required "rabbitmq.external.existingSecret is required when rabbitmq.external.enabled" .Values.rabbitmq.external.existingSecret }}{{- else -}}{{ include "dishpatch.fullname" . }}-amqp{{- end -}}
{{- end -}}

{{- define "dishpatch.amqpSecretKey" -}}
{{- if .Values.rabbitmq.external.enabled -}}{{ .Values.rabbitmq.external.key }}{{- else -}}url{{- end -}}
{{- end -}}

{{/* env common to every component */}}
{{- define "dishpatch.commonEnv" -}}
- name: DISHPATCH_AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "dishpatch.amqpSecretName" . }}
      key: {{ include "dishpatch.amqpSecretKey" . }}
- name: RUST_LOG
  value: info
{{- with .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* the one namespace watched, or "" for all */}}
{{- define "dishpatch.watchNamespace" -}}
{{- if eq (len .Values.watchNamespaces) 1 -}}{{ index .Values.watchNamespaces 0 }}{{- end -}}
{{- end -}}

{{/* a generated secret value kept across upgrades: (dict "root" $ "name" .. "key" .. "len" 32) */}}
{{- define "dishpatch.keep" -}}
{{- $s := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $s $s.data (hasKey $s.data .key) -}}{{ index $s.data .key | b64dec }}{{- else -}}{{ randAlphaNum (.len | int) }}{{- end -}}
{{- end -}}

{{/* "true" when a persistence block gets a PVC: enabled true, or auto with a
storageClass given or a default StorageClass in the cluster. (dict "root" $ "p" .Values.x.persistence) */}}
{{- define "dishpatch.pvc" -}}
{{- $p := .p -}}
{{- if eq (toString $p.enabled) "true" -}}true
{{- else if eq (toString $p.enabled) "auto" -}}
{{- $pvc := false -}}
{{- if $p.storageClass }}{{ $pvc = true }}{{ end -}}
{{- range (lookup "storage.k8s.io/v1" "StorageClass" "" "").items -}}
{{- if eq (index (.metadata.annotations | default dict) "storageclass.kubernetes.io/is-default-class" | default "") "true" }}{{ $pvc = true }}{{ end -}}
{{- end -}}
{{- if $pvc }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* A checksum of what the Secrets are made from (values, not the generated
parts, which lookup keeps): a pod rolls when its credentials change, and
never just because a release was upgraded. (dict "root" $ "c" "payment") */}}
{{- define "dishpatch.secretChecksum" -}}
{{- $v := .root.Values -}}
{{- $in := dict "amqp" (pick $v.rabbitmq "username" "password" "external") -}}
{{- if eq .c "payment" }}{{ $_ := set $in "stripe" $v.payment.stripe }}{{ end -}}
{{- if eq .c "notification" }}{{ $_ := set $in "webhook" $v.notification.webhook }}{{ end -}}
{{- if eq .c "facade" }}{{ $_ := set $in "jwt" (pick $v.facade.jwt "existingSecret") }}{{ end -}}
{{- toJson $in | sha256sum -}}
{{- end -}}
