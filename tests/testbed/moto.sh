#!/usr/bin/env bash
# moto server with IAM enforcement on, for s3grant's IAM-user-lifecycle tests.
#
#   tests/testbed/moto.sh install   venv with moto[server] under ~/.cache/s3grant-testbed/
#   tests/testbed/moto.sh up        start on 127.0.0.1:<free port>, bootstrap, write moto.env
#   tests/testbed/moto.sh down      stop the server started by `up` (by pid)
#   tests/testbed/moto.sh status    exit 0 when the server answers and enforces IAM
#   tests/testbed/moto.sh env       print moto.env (contains the admin secret key)
#   tests/testbed/moto.sh python    print the venv's python (used by rgw.sh)
#
# State: ${S3GRANT_TESTBED_DIR:-<repo>/.testbed}/$MOTO_NAME/ (pid, log, $MOTO_NAME.env).
# MOTO_NAME (default moto) names the instance: the testbed runs a second one, moto2,
# as a second AWS account (its own users, keys and admin) for grants that move between
# backends; its variables are S3GRANT_TEST_MOTO2_*.
# See tests/README.md for what moto enforces and what it does not.
set -euo pipefail

MOTO_VERSION="5.2.5"
# The bootstrap makes exactly this many unauthenticated requests (testbed_aws.py
# moto-bootstrap: CreateUser, PutUserPolicy, CreateAccessKey); every later request
# must be signed by a moto IAM identity.
FREE_REQUESTS=3

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TESTBED="${S3GRANT_TESTBED_DIR:-$REPO/.testbed}"
NAME="${MOTO_NAME:-moto}"
VAR_PREFIX="S3GRANT_TEST_$(echo "$NAME" | tr '[:lower:]' '[:upper:]')"
STATE="$TESTBED/$NAME"
CACHE="${S3GRANT_TESTBED_CACHE:-$HOME/.cache/s3grant-testbed}"
VENV="$CACHE/venv-moto-$MOTO_VERSION"
PY="$VENV/bin/python"
HELPER="$HERE/testbed_aws.py"
PIDFILE="$STATE/$NAME.pid"
ENVFILE="$STATE/$NAME.env"
LOG="$STATE/$NAME.log"

log() { echo "[$NAME] $*" >&2; }
die() { echo "[$NAME] error: $*" >&2; exit 1; }

system_python() {
  # Debian's python3 (python3-venv) is preferred: it does not depend on a pyenv setup.
  if [[ -x /usr/bin/python3 ]]; then echo /usr/bin/python3; else command -v python3; fi
}

ensure_venv_module() {
  local python="$1"
  "$python" -c 'import venv, ensurepip' 2>/dev/null && return 0
  log "installing python3-venv with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2; }
}

installed() {
  [[ -x "$VENV/bin/moto_server" ]] && "$PY" -c 'import boto3, moto' 2>/dev/null
}

cmd_install() {
  if installed; then return 0; fi
  local python; python="$(system_python)"
  ensure_venv_module "$python"
  log "creating venv $VENV with moto[server]==$MOTO_VERSION"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$python" -m venv "$VENV"
  "$VENV/bin/pip" install -q "moto[server]==$MOTO_VERSION" >&2 \
    || { rm -rf "$VENV"; die "pip install moto[server]==$MOTO_VERSION failed"; }
}

running_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid; pid="$(cat "$PIDFILE")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

endpoint() { sed -n "s/^export ${VAR_PREFIX}_ENDPOINT=//p" "$ENVFILE" 2>/dev/null; }

start_server() {
  local port="$1"
  : >"$LOG"
  # setsid: own session, so a Ctrl-C on the caller's terminal does not reach it.
  INITIAL_NO_AUTH_ACTION_COUNT="$FREE_REQUESTS" \
    setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" </dev/null >>"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
}

wait_ready() {
  local url="$1"
  if ! "$PY" "$HELPER" wait-http "$url/moto-api/" 30; then
    tail -n 30 "$LOG" >&2 || true
    cmd_down
    die "moto did not answer on $url within 30 s (log: $LOG)"
  fi
}

cmd_up() {
  cmd_install
  mkdir -p "$STATE"
  if running_pid >/dev/null && [[ -s "$ENVFILE" ]]; then
    if "$PY" "$HELPER" moto-check --env-file "$ENVFILE" --var-prefix "$VAR_PREFIX" >&2; then
      log "already running at $(endpoint) (pid $(cat "$PIDFILE"))"
      return 0
    fi
    log "running but unhealthy: restarting"
  fi
  cmd_down
  local port url
  port="$("$PY" "$HELPER" free-port)"
  url="http://127.0.0.1:$port"
  start_server "$port"
  wait_ready "$url"
  log "bootstrapping admin, role and bucket on $url"
  if ! "$PY" "$HELPER" moto-bootstrap --endpoint "$url" --env-file "$ENVFILE" --var-prefix "$VAR_PREFIX" >&2; then
    tail -n 30 "$LOG" >&2 || true
    cmd_down
    die "bootstrap failed"
  fi
  log "up at $url (pid $(cat "$PIDFILE"))"
}

cmd_down() {
  local pid
  if pid="$(running_pid)"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped pid $pid"
  fi
  rm -f "$PIDFILE" "$ENVFILE"
}

cmd_status() {
  local pid
  pid="$(running_pid)" || { echo "$NAME: down"; return 1; }
  [[ -s "$ENVFILE" ]] || { echo "$NAME: pid $pid but no $ENVFILE"; return 1; }
  if "$PY" "$HELPER" moto-check --env-file "$ENVFILE" --var-prefix "$VAR_PREFIX" >/dev/null 2>&1; then
    local rss; rss="$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid/status")"
    echo "$NAME: up at $(endpoint), pid $pid, RSS ${rss} MB, IAM enforced"
  else
    echo "$NAME: pid $pid at $(endpoint) but the health check failed (log: $LOG)"
    return 1
  fi
}

cmd_env() {
  [[ -s "$ENVFILE" ]] || die "no $ENVFILE: run '$0 up' first"
  cat "$ENVFILE"
}

cmd_python() { cmd_install; echo "$PY"; }

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  python) cmd_python ;;
  *) echo "usage: $0 install|up|down|status|env" >&2; exit 2 ;;
esac
