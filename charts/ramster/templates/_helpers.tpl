{{/* The chart's name. */}}
{{- define "ramster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name; pods are this plus -N, node names too. */}}
{{- define "ramster.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ramster.memoryServerName" -}}
{{- printf "%s-memory" (include "ramster.fullname" .) }}
{{- end }}

{{- define "ramster.headless" -}}
{{- printf "%s-peers" (include "ramster.fullname" .) }}
{{- end }}

{{/* The DNS domain of the headless Service; a pod's name is NAME.this. */}}
{{- define "ramster.headlessDomain" -}}
{{- printf "%s.%s.svc.%s" (include "ramster.headless" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "ramster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ramster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Every ramster pod: peers and memory servers alike. */}}
{{- define "ramster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ramster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The one Service a ServiceMonitor scrapes: the headless one. */}}
{{- define "ramster.scrapeLabel" -}}
ramster/scrape: "true"
{{- end }}

{{- define "ramster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ramster.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ramster.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret the pods mount: ca.crt, tls.crt, tls.key. */}}
{{- define "ramster.tlsSecret" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "ramster.fullname" .) }}
{{- end }}
{{- end }}

{{/* Node names a certificate must carry: every pod of both sets. */}}
{{- define "ramster.nodeNames" -}}
{{- $names := list }}
{{- $max := int .Values.tls.maxNodesPerSet }}
{{- range $i := until $max }}
{{- $names = append $names (printf "%s-%d" (include "ramster.fullname" $) $i) }}
{{- end }}
{{- if .Values.memoryServers.enabled }}
{{- range $i := until $max }}
{{- $names = append $names (printf "%s-%d" (include "ramster.memoryServerName" $) $i) }}
{{- end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* The seed list: the first peers, by their stable DNS names. */}}
{{- define "ramster.seeds" -}}
{{- $seeds := list }}
{{- $n := min (int .Values.cluster.seeds) (int .Values.peers.replicas) }}
{{- range $i := until (int $n) }}
{{- $seeds = append $seeds (printf "%s-%d.%s:%d" (include "ramster.fullname" $) $i (include "ramster.headlessDomain" $) (int $.Values.ports.peer)) }}
{{- end }}
{{- join "," $seeds }}
{{- end }}

{{/* Checks that the values choose exactly one certificate source. */}}
{{- define "ramster.validate" -}}
{{- $sources := 0 }}
{{- if .Values.tls.existingSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.tls.certManager.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.tls.generate.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if ne (int $sources) 1 }}
{{- fail "tls: set exactly one of existingSecret, certManager.enabled, generate.enabled" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.issuerRef.name is required with certManager.enabled" }}
{{- end }}
{{- if and (eq (toString .Values.peers.capacity) "auto") (not (dig "limits" "memory" "" .Values.peers.resources)) }}
{{- fail "peers.capacity auto sizes from the memory limit: set peers.resources.limits.memory (or a capacity)" }}
{{- end }}
{{- if and .Values.memoryServers.enabled (eq (toString .Values.memoryServers.capacity) "auto") (not (dig "limits" "memory" "" .Values.memoryServers.resources)) }}
{{- fail "memoryServers.capacity auto sizes from the memory limit: set memoryServers.resources.limits.memory (or a capacity)" }}
{{- end }}
{{- end }}

{{/*
A node pod. Arguments: dict with "root" (the chart context), "set" (the
peers or memoryServers values), "role" and "name" (the StatefulSet's name).
*/}}
{{- define "ramster.podTemplate" -}}
{{- $root := .root }}
{{- $set := .set }}
metadata:
  labels:
    {{- include "ramster.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
  annotations:
    # A changed node config restarts the pods (one at a time).
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $set.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "ramster.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  # A node asked to stop first drains: owners move the copies it holds to
  # other donors (at most cluster.stopDrainSeconds), then NBD clients get
  # their grace (30 s), then it stops; SIGKILL must not come before.
  terminationGracePeriodSeconds: {{ add (int $root.Values.cluster.stopDrainSeconds) 45 }}
  containers:
    - name: ramster
      image: {{ include "ramster.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args: ["node", "--config", "/etc/ramster/node.toml"]
      env:
        - name: RAMSTER_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: RAMSTER_ADVERTISE
          value: "$(RAMSTER_NAME).{{ include "ramster.headlessDomain" $root }}:{{ $root.Values.ports.peer }}"
        # The image sets these two for docker; the environment wins over
        # the config file, so the chart's values must come this way too.
        - name: RAMSTER_DATA_DIR
          value: /data
        - name: RAMSTER_ADMIN_LISTEN
          value: "0.0.0.0:{{ $root.Values.ports.admin }}"
        - name: RAMSTER_ROLE
          value: {{ .role }}
        - name: RAMSTER_CAPACITY
          value: {{ $set.capacity | quote }}
        {{- if and (eq .role "peer") $set.donate }}
        - name: RAMSTER_DONATE
          value: {{ $set.donate | quote }}
        {{- end }}
        {{- with $root.Values.cluster.zoneFromPodLabel }}
        - name: RAMSTER_ZONE
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['{{ . }}']
        {{- end }}
        - name: RUST_LOG
          value: {{ $root.Values.logLevel | quote }}
      ports:
        - name: peer
          containerPort: {{ $root.Values.ports.peer }}
          protocol: UDP
        - name: admin
          containerPort: {{ $root.Values.ports.admin }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /health/live
          port: admin
        periodSeconds: 2
        failureThreshold: 30
      livenessProbe:
        httpGet:
          path: /health/live
          port: admin
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      readinessProbe:
        httpGet:
          path: /health/ready
          port: admin
        periodSeconds: 5
        timeoutSeconds: 5
        failureThreshold: 2
      resources:
        {{- toYaml $set.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /data
        - name: config
          mountPath: /etc/ramster
          readOnly: true
        - name: tls
          mountPath: /certs
          readOnly: true
  volumes:
    - name: config
      configMap:
        name: {{ include "ramster.fullname" $root }}
    - name: tls
      secret:
        secretName: {{ include "ramster.tlsSecret" $root }}
        defaultMode: 0440
        items:
          - {key: ca.crt, path: ca.crt}
          - {key: tls.crt, path: node.crt}
          - {key: tls.key, path: node.key}
    {{- if not $root.Values.persistence.enabled }}
    - name: data
      emptyDir: {}
    {{- end }}
  {{- with $set.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $set.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $set.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  topologySpreadConstraints:
    {{- if $set.topologySpreadConstraints }}
    {{- toYaml $set.topologySpreadConstraints | nindent 4 }}
    {{- else }}
    # A page's copies go to other nodes than its owner, peers and memory
    # servers alike: spread all of them, so that one host going down takes
    # as few copies of a page as the hosts allow. A preference only.
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "ramster.selectorLabels" $root | nindent 10 }}
    {{- end }}
{{- end }}

{{- define "ramster.volumeClaimTemplates" -}}
{{- if .Values.persistence.enabled }}
volumeClaimTemplates:
  - metadata:
      name: data
    spec:
      accessModes: [ReadWriteOnce]
      {{- with .Values.persistence.storageClassName }}
      storageClassName: {{ . }}
      {{- end }}
      resources:
        requests:
          storage: {{ .Values.persistence.size }}
{{- end }}
{{- end }}
