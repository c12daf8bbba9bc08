#!/usr/bin/env bash
# A one-node Ceph cluster with RGW (S3, IAM roles, STS) on loopback, for s3grant's
# policy-evaluation and STS tests.
#
#   tests/testbed/rgw.sh install   apt-get install radosgw ceph-mon ceph-osd ceph-common
#   tests/testbed/rgw.sh up        new cluster: mon + memstore OSD + radosgw on 127.0.0.1,
#                                  admin user, STS role, test bucket; writes rgw.env
#   tests/testbed/rgw.sh down      stop the daemons started by `up` (by pid), wipe state
#   tests/testbed/rgw.sh status    exit 0 when RGW answers and STS confinement holds
#   tests/testbed/rgw.sh env       print rgw.env (contains the admin secret key)
#
# Everything (ceph.conf, keyrings, data, logs, pid files) lives in
# ${S3GRANT_TESTBED_DIR:-<repo>/.testbed}/rgw/; nothing in /etc/ceph. Memstore keeps
# the data in memory: every `up` after a `down` starts an empty cluster.
set -euo pipefail

PACKAGES=(radosgw ceph-mon ceph-osd ceph-common)
ADMIN_UID="s3grant-admin"
ADMIN_CAPS="roles=*;user-policy=*;users=*;buckets=*;metadata=*"
RGW_NAME="client.rgw.a"
READY_TIMEOUT="${S3GRANT_TESTBED_RGW_TIMEOUT:-90}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TESTBED="${S3GRANT_TESTBED_DIR:-$REPO/.testbed}"
STATE="$TESTBED/rgw"
CONF="$STATE/ceph.conf"
ENVFILE="$STATE/rgw.env"
HELPER="$HERE/testbed_aws.py"
PY=""  # the testbed venv's python, set by need_python

log() { echo "[rgw] $*" >&2; }
die() { echo "[rgw] error: $*" >&2; exit 1; }

need_python() {
  [[ -n "$PY" ]] || PY="$("$HERE/moto.sh" python)"
}

ceph_cli() { timeout 60 ceph -c "$CONF" "$@"; }

# --- install ---------------------------------------------------------------------

packages_missing() {
  local pkg missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  echo "${missing[*]}"
}

cmd_install() {
  local missing; missing="$(packages_missing)"
  if [[ -n "$missing" ]]; then
    log "installing $missing with apt-get"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2 \
      || { apt-get update -q >&2 \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2; } \
      || die "apt-get install $missing failed"
  fi
  need_python
}

# --- pids ------------------------------------------------------------------------

pidfile() { echo "$STATE/run/$1.pid"; }

alive() {
  local f; f="$(pidfile "$1")"
  [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

all_alive() { alive mon && alive osd && alive rgw; }

# Start a daemon in the foreground of its own session, logs to a file, pid recorded.
spawn() {
  local name="$1"; shift
  setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
  echo $! >"$(pidfile "$name")"
}

stop() {
  local name="$1" f pid
  f="$(pidfile "$name")"
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped $name (pid $pid)"
  fi
  rm -f "$f"
}

# --- cluster ---------------------------------------------------------------------

write_conf() {
  local fsid="$1" mon_port="$2" rgw_port="$3" sts_key="$4"
  cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$mon_port]
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind msgr2 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $STATE/keyring.admin
run dir = $STATE/run
admin socket = $STATE/run/\$cluster-\$name.asok
log file = $STATE/log/\$cluster-\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
auth allow insecure global id reclaim = false
# The mon checks its disk: warn/stop thresholds suited to a throwaway test cluster.
mon data avail warn = 5
mon data avail crit = 1
# RGW creates its pools one by one at first start; commit map changes quickly.
paxos propose interval = 0.05
paxos min wait = 0.01
osd pool default pg autoscale mode = off

[mon]
mon data = $STATE/mon/\$cluster-\$id
keyring = $STATE/mon/\$cluster-\$id/keyring

[osd]
osd data = $STATE/osd/\$cluster-\$id
keyring = $STATE/osd/\$cluster-\$id/keyring
osd objectstore = memstore
memstore device bytes = 1073741824

[client]
admin socket = $STATE/run/\$cluster-\$name.\$pid.asok
log file = $STATE/log/\$cluster-\$name.log

[$RGW_NAME]
keyring = $STATE/keyring.rgw
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw data = $STATE/rgw-data
rgw sts key = $sts_key
rgw s3 auth use sts = true
rgw dns name = 127.0.0.1
EOF
}

create_mon() {
  local fsid="$1" mon_port="$2"
  ceph-authtool --create-keyring "$STATE/keyring.mon" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$STATE/keyring.admin" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$STATE/keyring.mon" --import-keyring "$STATE/keyring.admin" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$STATE/monmap" >/dev/null
  mkdir -p "$STATE/mon/ceph-a"
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$STATE/monmap" --keyring "$STATE/keyring.mon"
  spawn mon ceph-mon -c "$CONF" -i a -f
}

create_osd() {
  local osd_uuid id
  osd_uuid="$(cat /proc/sys/kernel/random/uuid)"
  id="$(ceph_cli osd new "$osd_uuid")"
  [[ "$id" == 0 ]] || die "expected osd id 0, got '$id'"
  mkdir -p "$STATE/osd/ceph-0"
  ceph-osd -c "$CONF" -i 0 --mkfs --mkkey --osd-uuid "$osd_uuid" --no-mon-config \
    >>"$STATE/log/osd-mkfs.out" 2>&1 || { tail -n 20 "$STATE/log/osd-mkfs.out" >&2; die "ceph-osd --mkfs failed"; }
  ceph_cli auth add osd.0 -i "$STATE/osd/ceph-0/keyring" \
    osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' >/dev/null 2>&1
  spawn osd ceph-osd -c "$CONF" -i 0 -f
}

create_rgw() {
  ceph_cli auth get-or-create "$RGW_NAME" mon 'allow rw' osd 'allow rwx' \
    -o "$STATE/keyring.rgw" >/dev/null 2>&1
  mkdir -p "$STATE/rgw-data"
  spawn rgw radosgw -c "$CONF" -n "$RGW_NAME" -f
}

log_tail() {
  local f
  for f in "$STATE"/log/*; do
    [[ -f "$f" ]] || continue
    echo "--- $f (last 15 lines)" >&2
    tail -n 15 "$f" >&2
  done
}

wait_rgw() {
  local url="$1"
  if ! "$PY" "$HELPER" wait-http "$url" "$READY_TIMEOUT"; then
    log_tail
    alive mon || log "ceph-mon is not running"
    alive osd || log "ceph-osd is not running"
    alive rgw || log "radosgw is not running"
    cmd_down
    die "RGW did not answer on $url within ${READY_TIMEOUT}s (logs above and in $STATE/log)"
  fi
}

create_admin_user() {
  local keys="$STATE/admin-keys.env"
  timeout 60 radosgw-admin -c "$CONF" user create --uid="$ADMIN_UID" \
      --display-name="s3grant testbed admin" --caps="$ADMIN_CAPS" 2>>"$STATE/log/radosgw-admin.err" \
    | "$PY" "$HELPER" keys-from-user-json --out "$keys" \
    || die "radosgw-admin user create failed (see $STATE/log/radosgw-admin.err)"
  echo "$keys"
}

bootstrap() {
  local url="$1" keys
  keys="$(create_admin_user)"
  # shellcheck disable=SC1090
  (set -a; . "$keys"; "$PY" "$HELPER" rgw-bootstrap --endpoint "$url" --admin-uid "$ADMIN_UID" \
      --ceph-conf "$CONF" --env-file "$ENVFILE" >&2) \
    || { log_tail; die "bootstrap failed"; }
  rm -f "$keys"
}

cmd_up() {
  cmd_install
  if all_alive && [[ -s "$ENVFILE" ]]; then
    if "$PY" "$HELPER" rgw-check --env-file "$ENVFILE" >&2; then
      log "already running at $(endpoint)"
      return 0
    fi
    log "running but unhealthy: recreating"
  fi
  cmd_down
  rm -rf "$STATE/log"
  mkdir -p "$STATE/run" "$STATE/log"
  chmod 700 "$STATE"
  local fsid mon_port rgw_port sts_key url
  fsid="$(cat /proc/sys/kernel/random/uuid)"
  mon_port="$("$PY" "$HELPER" free-port)"
  rgw_port="$("$PY" "$HELPER" free-port)"
  [[ "$mon_port" != "$rgw_port" ]] || rgw_port="$("$PY" "$HELPER" free-port)"
  sts_key="$(head -c 64 /dev/urandom | tr -dc 'a-zA-Z0-9' | head -c 16)"
  [[ ${#sts_key} == 16 ]] || sts_key="$(printf '%s' "$fsid" | tr -d - | head -c 16)"
  url="http://127.0.0.1:$rgw_port"
  write_conf "$fsid" "$mon_port" "$rgw_port" "$sts_key"
  log "starting mon on 127.0.0.1:$mon_port"
  create_mon "$fsid" "$mon_port"
  log "starting memstore OSD"
  create_osd
  log "starting radosgw on $url"
  create_rgw
  wait_rgw "$url"
  log "bootstrapping admin user, STS role and bucket"
  bootstrap "$url"
  log "up at $url (pids: mon $(cat "$(pidfile mon)"), osd $(cat "$(pidfile osd)"), rgw $(cat "$(pidfile rgw)"))"
}

cmd_down() {
  stop rgw
  stop osd
  stop mon
  # The cluster lives in memory (memstore) and in this directory: start clean next
  # time, but keep the logs of the last run for a look after a failure.
  [[ -d "$STATE" ]] && find "$STATE" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} +
  return 0
}

endpoint() { sed -n 's/^export S3GRANT_TEST_RGW_ENDPOINT=//p' "$ENVFILE" 2>/dev/null; }

rss_mb() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$(cat "$(pidfile "$1")")/status"; }

cmd_status() {
  local name down=0
  for name in mon osd rgw; do
    alive "$name" || { echo "rgw: $name is not running"; down=1; }
  done
  [[ $down == 0 ]] || { echo "rgw: down"; return 1; }
  [[ -s "$ENVFILE" ]] || { echo "rgw: daemons running but no $ENVFILE"; return 1; }
  need_python
  if "$PY" "$HELPER" rgw-check --env-file "$ENVFILE" >/dev/null 2>&1; then
    echo "rgw: up at $(endpoint), RSS mon $(rss_mb mon) MB + osd $(rss_mb osd) MB + radosgw $(rss_mb rgw) MB, STS confinement holds"
  else
    echo "rgw: daemons running at $(endpoint) but the health check failed (logs: $STATE/log)"
    return 1
  fi
}

cmd_env() {
  [[ -s "$ENVFILE" ]] || die "no $ENVFILE: run '$0 up' first"
  cat "$ENVFILE"
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 install|up|down|status|env" >&2; exit 2 ;;
esac
