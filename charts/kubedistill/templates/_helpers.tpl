{{/* Chart name, overridable. */}}
{{- define "kubedistill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects (cluster-scoped ones too: unique per release). */}}
{{- define "kubedistill.fullname" -}}
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

{{- define "kubedistill.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the operator pod. Never change them: a Deployment's selector is immutable. */}}
{{- define "kubedistill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubedistill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels of every object of the chart. app.kubernetes.io/managed-by is Helm here: the operator
watches only objects labelled managed-by=kubedistill, so it never mistakes its own Deployment
for a serving Deployment.
*/}}
{{- define "kubedistill.labels" -}}
helm.sh/chart: {{ include "kubedistill.chart" . }}
app.kubernetes.io/name: {{ include "kubedistill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubedistill
{{- end }}

{{- define "kubedistill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubedistill.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubedistill.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
What the operator does in a namespace it watches, and nothing more (see kube/client.py,
reconcile/cycle.py and handlers.py). Server-side apply of an object that does not exist yet is
a create: every kind the operator applies needs both create and patch.
*/}}
{{- define "kubedistill.operatorRules" -}}
# DistillationJob / DistilledModel: kopf lists and watches them and keeps its bookkeeping in
# annotations (patch); the reconcile reads the latest copy (get). A DistillationJob publishes
# its DistilledModel with server-side apply (create, patch).
- apiGroups: ["kubedistill.io"]
  resources: ["distillationjobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubedistill.io"]
  resources: ["distilledmodels"]
  verbs: ["get", "list", "watch", "patch", "create"]
# The status subresources: phase, conditions, stages (merge patch).
- apiGroups: ["kubedistill.io"]
  resources: ["distillationjobs/status", "distilledmodels/status"]
  verbs: ["patch"]
# Children carry owner references with blockOwnerDeletion; clusters that run the
# OwnerReferencesPermissionEnforcement admission plugin require this to set them.
- apiGroups: ["kubedistill.io"]
  resources: ["distillationjobs/finalizers", "distilledmodels/finalizers"]
  verbs: ["update"]
# Stage Jobs: created, watched (label-filtered), deleted when a spec edit supersedes them or
# their run falls out of the history (settings.jobs.historyLimit).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "delete"]
# The worker config of each stage (create) and of each served model version (apply), listed to
# prune the fetch configs of old model versions; deleted with their Job beyond the history. A
# DistillationJob's progress ConfigMap: created, watched (label-filtered), read; the Role its
# stage pods get may read and patch it, which the operator may grant only if it holds both.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The rendezvous Service of multi-node training (create; deleted with its Job beyond the
# history) and a model's Service (apply).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch", "delete"]
# A failed stage's pods hold the worker's termination message; an adapter pool's pods report
# what their sidecar loaded (watched, label-filtered).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# The adapter sidecar's Role grants patching pod status conditions: Kubernetes lets the operator
# grant only what it holds itself.
- apiGroups: [""]
  resources: ["pods/status"]
  verbs: ["patch"]
# An adapter pool's sidecars, and a DistillationJob's stage pods (the progress writers): their
# ServiceAccount, Role and RoleBinding (applied, or created once).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "patch"]
# Events on DistillationJobs and DistilledModels (the operator's and kopf's, core/v1).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# vLLM serving Deployments: applied, read, watched (label-filtered) for readiness.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# A served model's PodDisruptionBudget and (with serving.autoscaling) HorizontalPodAutoscaler.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "create", "patch", "delete"]
# Integrations, written where their CRDs are installed, listed and deleted when no longer wanted:
# KEDA ScaledObjects (autoscaling on vLLM's queue), Prometheus Operator monitors (settings.serving.
# monitor), Gateway API Inference Extension pools and objectives (a model's spec.routing).
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors", "servicemonitors"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["inference.networking.x-k8s.io"]
  resources: ["inferenceobjectives"]
  verbs: ["list", "create", "patch", "delete"]
{{- end }}

{{/*
Cluster-scoped reads kopf needs: it watches CRDs to notice ours being installed or upgraded, and,
when it watches a list of namespaces, it lists and watches namespaces to notice them come and go.
*/}}
{{- define "kubedistill.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.settings.namespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
