# shellcheck shell=bash
# Common settings for hack/cluster scripts. Source it; do not run it.
HACK_CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
. "$HACK_CLUSTER_DIR/versions.env"

# Everything lives outside the repository: binaries keyed by the Kubernetes version,
# cluster state in one fixed place so that `up` prints the same KUBECONFIG every time.
KUBEDISTILL_CACHE="${KUBEDISTILL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubedistill}"
KD_BIN_DIR="$KUBEDISTILL_CACHE/$KUBE_VERSION/bin"
KD_CLUSTER_NAME="${KUBEDISTILL_CLUSTER_NAME:-cluster}"
KD_CLUSTER_DIR="$KUBEDISTILL_CACHE/$KD_CLUSTER_NAME"
KD_KUBECONFIG="$KD_CLUSTER_DIR/kubeconfig"

kd_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
kd_die() { kd_log "ERROR: $*"; exit 1; }

# Components in start order; `down` stops them in reverse.
KD_COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

kd_pid_file() { echo "$KD_CLUSTER_DIR/run/$1.pid"; }

# kd_pid_alive COMPONENT: prints the pid when the recorded process still runs and is ours
# (its command line names our cluster directory), so a recycled pid is never mistaken for it.
kd_pid_alive() {
  local f pid
  f=$(kd_pid_file "$1")
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] && kd_alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$KD_CLUSTER_DIR/" || return 1
  echo "$pid"
}

# kd_cluster_pids: every running cluster component (etcd, kube-*, kwok from our bin dir) whose
# command line names this cluster's directory, found without trusting pid files.
kd_cluster_pids() {
  local p exe
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
    case "${exe##*/}" in
      etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kwok) ;;
      *) continue ;;
    esac
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$KD_CLUSTER_DIR/"; then
      echo "$p"
    fi
  done
}

# kd_alive PID: the process exists and has not exited (a zombie waiting for its parent to reap
# it has closed its files and ports already, and may never be reaped in a container).
kd_alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

kd_port_listening() { [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]; }

# kd_free_port: a TCP port below the ephemeral range that nothing listens on.
kd_free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 12000 ))
    kd_port_listening "$p" && continue
    [[ " ${KD_TAKEN_PORTS:-} " == *" $p "* ]] && continue
    KD_TAKEN_PORTS="${KD_TAKEN_PORTS:-} $p"
    echo "$p"; return 0
  done
  kd_die "no free port found"
}

kd_lock() { # serialise up/down of one cluster (pytest workers, other scripts)
  mkdir -p "$KD_CLUSTER_DIR"
  exec 9>"$KD_CLUSTER_DIR/.lock"
  flock -w 300 9 || kd_die "timed out waiting for $KD_CLUSTER_DIR/.lock"
}
