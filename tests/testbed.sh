#!/usr/bin/env bash
# The one entry point to s3grant's test servers: a Kubernetes API server (kube),
# moto (IAM users and keys, enforced), a second moto (moto2: a second AWS account, for
# grants that move between backends) and Ceph RGW (real policy evaluation, STS).
#
#   tests/testbed.sh up           install what is missing, start all three, write $STATE/env
#   tests/testbed.sh down         stop exactly what `up` started (by pid)
#   tests/testbed.sh status       one line per server; exit non-zero if any is down
#   tests/testbed.sh env          print the exports tests need (includes secret keys)
#   tests/testbed.sh test [ARGS]  up, then `cargo test --workspace ARGS` with the env
#                                 loaded; the servers are left running afterwards
#
# STATE=${S3GRANT_TESTBED_DIR:-<repo>/.testbed}; each server has its own subdirectory
# and its own script in tests/testbed/. See tests/README.md.
#
# S3GRANT_TESTBED_WITHOUT_KUBE=1 runs without the Kubernetes API server (only while
# tests/testbed/kube.sh is being written); it is announced loudly and recorded in the
# env file, never assumed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
export S3GRANT_TESTBED_DIR="${S3GRANT_TESTBED_DIR:-$REPO/.testbed}"
STATE="$S3GRANT_TESTBED_DIR"
ENVFILE="$STATE/env"
WITHOUT_KUBE="${S3GRANT_TESTBED_WITHOUT_KUBE:-0}"

log() { echo "[testbed] $*"; }
die() { echo "[testbed] error: $*" >&2; exit 1; }

# Set SERVERS to the servers to run, in start order.
select_servers() {
  SERVERS=(moto moto2 rgw)
  if [[ "$WITHOUT_KUBE" == 1 ]]; then
    echo "[testbed] WARNING: S3GRANT_TESTBED_WITHOUT_KUBE=1: no Kubernetes API server;" \
      "tests that need one will fail" >&2
  elif [[ -x "$HERE/testbed/kube.sh" ]]; then
    SERVERS=(kube "${SERVERS[@]}")
  else
    die "tests/testbed/kube.sh is missing; set S3GRANT_TESTBED_WITHOUT_KUBE=1 to run without Kubernetes"
  fi
}

script() {
  case "$1" in
    moto2) echo "$HERE/testbed/moto.sh" ;;
    *) echo "$HERE/testbed/$1.sh" ;;
  esac
}

# Run "<server's script> <verb>"; moto2 is a second instance of moto.sh.
server() {
  local name="$1"; shift
  MOTO_NAME="$name" "$(script "$name")" "$@"
}

envfile_of() {
  case "$1" in
    kube) echo "$STATE/kube/kube.env" ;;
    *) echo "$STATE/$1/$1.env" ;;
  esac
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Run "<server>.sh <verb>" and report how long it took.
timed() {
  local server="$1" verb="$2" t0
  t0="$(now)"
  server "$server" "$verb" || die "$server $verb failed"
  log "$server $verb: $(since "$t0") s"
}

write_env() {
  local server f tmp="$ENVFILE.tmp"
  mkdir -p "$STATE"
  (
    umask 077
    {
      echo "export S3GRANT_TESTBED=1"
      echo "export S3GRANT_TESTBED_DIR=$STATE"
      [[ "$WITHOUT_KUBE" == 1 ]] && echo "export S3GRANT_TESTBED_WITHOUT_KUBE=1"
      for server in "${SERVERS[@]}"; do
        f="$(envfile_of "$server")"
        [[ -s "$f" ]] || die "$server is up but wrote no $f"
        grep '^export ' "$f"
      done
    } >"$tmp"
  )
  mv "$tmp" "$ENVFILE"
}

cmd_up() {
  local server t0
  select_servers
  t0="$(now)"
  for server in "${SERVERS[@]}"; do timed "$server" install; done
  for server in "${SERVERS[@]}"; do timed "$server" up; done
  write_env
  log "all up in $(since "$t0") s; env in $ENVFILE (load with: set -a; . $ENVFILE; set +a)"
}

cmd_down() {
  local server failed=0
  # Whatever is there, whether or not kube was skipped at `up`.
  SERVERS=(moto moto2 rgw)
  [[ -x "$(script kube)" ]] && SERVERS=(kube "${SERVERS[@]}")
  for server in "${SERVERS[@]}"; do
    server "$server" down || { echo "[testbed] $server down failed" >&2; failed=1; }
  done
  rm -f "$ENVFILE"
  return "$failed"
}

cmd_status() {
  local server failed=0
  select_servers
  for server in "${SERVERS[@]}"; do
    server "$server" status || failed=1
  done
  [[ -s "$ENVFILE" ]] || { echo "env: $ENVFILE missing (run tests/testbed.sh up)"; failed=1; }
  return "$failed"
}

cmd_env() {
  [[ -s "$ENVFILE" ]] || die "no $ENVFILE: run tests/testbed.sh up first"
  cat "$ENVFILE"
}

cmd_test() {
  cmd_up
  set -a
  # shellcheck disable=SC1090
  . "$ENVFILE"
  set +a
  local rc=0 t0
  t0="$(now)"
  log "cargo test --workspace $*"
  (cd "$REPO" && cargo test --workspace "$@") || rc=$?
  log "cargo test finished in $(since "$t0") s (exit $rc)"
  log "the testbed is still running: stop it with tests/testbed.sh down"
  return "$rc"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  test) shift; cmd_test "$@" ;;
  *) echo "usage: $0 up|down|status|env|test [cargo test args]" >&2; exit 2 ;;
esac
