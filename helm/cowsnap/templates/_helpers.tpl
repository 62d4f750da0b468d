{{/* Names and labels shared by every template. */}}

{{/* The CSI driver name: fixed in the cowsnap binary. */}}
{{- define "cowsnap.driverName" -}}csi.cowsnap.io{{- end -}}

{{- define "cowsnap.fullname" -}}
{{- if contains "cowsnap" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-cowsnap" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cowsnap.labels" -}}
app.kubernetes.io/name: cowsnap
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component (control, worker). */}}
{{- define "cowsnap.selector" -}}
app.kubernetes.io/name: cowsnap
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cowsnap.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "cowsnap.sidecarImage" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{- define "cowsnap.tlsSecret" -}}
{{- default (printf "%s-tls" (include "cowsnap.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{- define "cowsnap.tokenSecret" -}}
{{- default (printf "%s-token" (include "cowsnap.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "cowsnap.snapshotMetadataSecret" -}}
{{- default (printf "%s-snapshot-metadata-tls" (include "cowsnap.fullname" .)) .Values.snapshotMetadata.existingSecret -}}
{{- end -}}

{{- define "cowsnap.snapshotMetadataService" -}}
{{- printf "%s-snapshot-metadata" (include "cowsnap.fullname" .) -}}
{{- end -}}

{{/* The socket directory of the node plugin on the host. */}}
{{- define "cowsnap.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) (include "cowsnap.driverName" .) -}}
{{- end -}}

{{/* The securityContext of every container that needs no privilege. */}}
{{- define "cowsnap.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
