#!/usr/bin/env bash
# A local Kubernetes control plane for s3grant's tests: etcd + our own API
# server (tests/apiserver), built offline from Debian sid's Go source packages
# of the upstream Kubernetes server libraries. See tests/apiserver/README.md.
#
#   kube.sh install   fetch packages and build (cached; no-op when warm)
#   kube.sh up        install if needed, start etcd + apiserver, write kubeconfig
#   kube.sh down      stop what `up` started (pid files), remove etcd data
#   kube.sh status    is each process running, does /readyz answer (exit 1 if not)
#   kube.sh env       print $STATE/kube.env (export KUBECONFIG=...)
#   kube.sh restart   stop and start the API server process only (same port, certificates
#                     and etcd, data kept), wait for /readyz; prints how long it was down.
#                     A fault for tests: every client's connections and watches break.
#   kube.sh compact   compact etcd at its current revision (through etcd's v3 HTTP/JSON
#                     gateway: the Debian package ships no etcdctl), so a watch that
#                     resumes from an older resourceVersion gets 410 Gone; prints the
#                     revision. etcd's port is in $STATE/ports.env (ETCD_PORT).
#
# Environment:
#   S3GRANT_TESTBED_DIR      state root (default <repo>/.testbed); state in $S3GRANT_TESTBED_DIR/kube
#   S3GRANT_TESTBED_CACHE    build cache (default ${XDG_CACHE_HOME:-~/.cache}/s3grant-testbed)
#   S3GRANT_KUBE_REFRESH=1   re-read Debian sid's package lists now (default: when older than 7 days)
#   S3GRANT_KUBE_PORT        apiserver port (default: first free from 16443)
#   S3GRANT_KUBE_READY_TIMEOUT  seconds to wait for /readyz (default 90)
#   S3GRANT_KUBE_RESTART_SIGNAL signal `restart` stops the API server with: TERM (default,
#                               a graceful shutdown) or KILL (a crash)
#   S3GRANT_KUBE_RESTART_DOWN_S seconds `restart` keeps the API server stopped (default 0:
#                               started again at once), for a longer outage
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
SRC_DIR=$REPO_ROOT/tests/apiserver
STATE=${S3GRANT_TESTBED_DIR:-$REPO_ROOT/.testbed}/kube
CACHE=${S3GRANT_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/s3grant-testbed}
WORK=$CACHE/kube-work          # private apt state, unpacked package roots, Go build cache
APT_DIR=$WORK/apt
BIN_NAME=s3grant-test-apiserver
# Top-level packages; their golang-* Depends closure is fetched too.
ROOT_PKGS=(golang-k8s-apiextensions-apiserver-dev golang-k8s-apiserver-dev golang-k8s-client-go-dev golang-go)

log() { echo "kube.sh: $*" >&2; }
die() { echo "kube.sh: ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- host tools
ensure_host_tools() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu host required)"
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } \
      || die "could not install ${missing[*]}"
  fi
}

# ---------------------------------------------------------------- private apt
# A throwaway apt configuration: own lists/cache/status, only Debian sid main.
# The system's apt sources and state are never read or written.
apt_setup() {
  mkdir -p "$APT_DIR"/{lists/partial,cache/archives/partial,etc/parts,etc/prefparts,etc/trusted.d}
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
    > "$APT_DIR/etc/sources.list"
  : > "$APT_DIR/status.tmp"; [ -f "$APT_DIR/status" ] || mv "$APT_DIR/status.tmp" "$APT_DIR/status"
  cat > "$APT_DIR/apt.conf" <<EOF
Dir::State "$APT_DIR";
Dir::State::Lists "$APT_DIR/lists";
Dir::State::status "$APT_DIR/status";
Dir::Cache "$APT_DIR/cache";
Dir::Etc::SourceList "$APT_DIR/etc/sources.list";
Dir::Etc::SourceParts "$APT_DIR/etc/parts";
Dir::Etc::Preferences "$APT_DIR/etc/preferences";
Dir::Etc::PreferencesParts "$APT_DIR/etc/prefparts";
Dir::Etc::TrustedParts "$APT_DIR/etc/trusted.d";
APT::Architecture "amd64";
APT::Get::AllowUnauthenticated "false";
APT::Sandbox::User "root";
EOF
  export APT_CONFIG=$APT_DIR/apt.conf
}

# Refresh sid's package lists if asked or stale, then resolve the package
# closure and write "name version" lines to $APT_DIR/versions.txt.
apt_resolve() {
  apt_setup
  local stamp=$APT_DIR/lists.stamp
  if [ "${S3GRANT_KUBE_REFRESH:-0}" = 1 ] || [ ! -f "$stamp" ] || [ ! -f "$APT_DIR/versions.txt" ] \
     || [ -n "$(find "$stamp" -mtime +7 2>/dev/null)" ]; then
    log "reading Debian sid package lists (private apt config)"
    apt-get update -q >"$APT_DIR/update.log" 2>&1 || { tail -20 "$APT_DIR/update.log" >&2; die "apt-get update (sid) failed"; }
    local pkgs
    pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
             --no-replaces --no-enhances --no-pre-depends "${ROOT_PKGS[@]}" etcd-server 2>/dev/null \
           | grep -E '^(golang-[^ ]*|etcd-server)$' | sort -u)
    [ -n "$pkgs" ] || die "could not resolve the package closure of ${ROOT_PKGS[*]} in sid"
    # shellcheck disable=SC2086
    apt-cache show --no-all-versions $pkgs 2>/dev/null \
      | awk '/^Package: /{p=$2} /^Version: /{print p, $2}' | sort -u > "$APT_DIR/versions.txt.new"
    mv "$APT_DIR/versions.txt.new" "$APT_DIR/versions.txt"
    touch "$stamp"
  fi
}

pkg_version() { awk -v p="$1" '$1==p{print $2}' "$APT_DIR/versions.txt"; }

# Download and unpack the closure into $WORK/root-<hash of versions>.
fetch_root() {
  local vhash=$1 root=$WORK/root-$vhash
  if [ -f "$root/.complete" ]; then echo "$root"; return; fi
  local debs=$WORK/debs-$vhash
  rm -rf "$root" "$debs"; mkdir -p "$root" "$debs"
  log "downloading $(wc -l < "$APT_DIR/versions.txt") Debian packages (Go toolchain, k8s libraries, etcd)"
  ( cd "$debs" && awk '{print $1"="$2}' "$APT_DIR/versions.txt" | xargs apt-get download -q >"$debs/download.log" 2>&1 ) \
    || { tail -20 "$debs/download.log" >&2; die "apt-get download failed"; }
  log "unpacking into $root"
  local d
  for d in "$debs"/*.deb; do dpkg-deb -x "$d" "$root" || die "dpkg-deb -x $d failed"; done
  rm -rf "$debs"
  touch "$root/.complete"
  # Older roots belong to older package versions: drop them.
  find "$WORK" -maxdepth 1 -name 'root-*' ! -name "root-$vhash" -exec rm -rf {} +
  echo "$root"
}

src_hash() {
  (cd "$SRC_DIR" && cat $(ls ./*.go | sort)) | sha256sum | cut -c1-16
}

# Sets BIN_DIR to the cached build for the current package versions + source.
install() {
  ensure_host_tools
  apt_resolve
  local vhash shash key
  vhash=$(sha256sum "$APT_DIR/versions.txt" | cut -c1-12)
  shash=$(src_hash)
  key=$vhash-$shash
  BIN_DIR=$CACHE/kube-$key
  if [ -x "$BIN_DIR/$BIN_NAME" ] && [ -x "$BIN_DIR/etcd" ]; then return; fi

  local root goroot kver
  root=$(fetch_root "$vhash")
  goroot=$(readlink -f "$root/usr/lib/go")
  [ -x "$goroot/bin/go" ] || die "no Go toolchain in $root/usr/lib (golang-go $(pkg_version golang-go))"
  kver=$(pkg_version golang-k8s-apiserver-dev); kver=${kver#*:}; kver=${kver%%-*}   # 0.36.4
  local minor=${kver#0.}; minor=${minor%%.*}
  local gitversion=v1.${kver#0.}

  log "building $BIN_NAME (k8s.io/apiserver $kver = Kubernetes $gitversion, $("$goroot/bin/go" version | awk '{print $3}'))"
  local gp=$WORK/build/gopath
  rm -rf "$gp/src/s3grant.io/testapiserver"; mkdir -p "$gp/src/s3grant.io/testapiserver"
  cp "$SRC_DIR"/*.go "$gp/src/s3grant.io/testapiserver/"
  mkdir -p "$BIN_DIR.tmp"
  local buildlog=$WORK/build/build.log
  if ! ( cd "$gp/src/s3grant.io/testapiserver" && \
         env GOROOT="$goroot" GOPATH="$gp:$root/usr/share/gocode" GO111MODULE=off GOTOOLCHAIN=local \
             GOPROXY=off GOFLAGS= GOTELEMETRY=off CGO_ENABLED=0 GOCACHE="$WORK/build/gocache" \
             "$goroot/bin/go" build -trimpath -o "$BIN_DIR.tmp/$BIN_NAME" -ldflags "-s -w \
               -X k8s.io/component-base/version.gitVersion=$gitversion \
               -X k8s.io/component-base/version.gitMajor=1 \
               -X k8s.io/component-base/version.gitMinor=$minor \
               -X k8s.io/component-base/version.gitTreeState=clean" . ) >"$buildlog" 2>&1; then
    tail -40 "$buildlog" >&2
    rm -rf "$BIN_DIR.tmp"
    echo "kube.sh: ERROR: building tests/apiserver failed against Debian sid packages:" >&2
    grep -E '^(golang-go|golang-1\.[0-9]+-go|golang-k8s-(apiserver|apiextensions-apiserver|client-go|apimachinery|api|kube-openapi|component-base)-dev|etcd-server) ' \
      "$APT_DIR/versions.txt" | sed 's/^/    /' >&2
    echo "  (full log: $buildlog; all versions: $APT_DIR/versions.txt)" >&2
    exit 1
  fi
  cp "$root/usr/bin/etcd" "$BIN_DIR.tmp/etcd"
  {
    echo "# built $(date -u +%Y-%m-%dT%H:%M:%SZ) from Debian sid packages"
    echo "kubernetes_version $gitversion"
    echo "go $("$goroot/bin/go" version | awk '{print $3}')"
    echo "etcd $("$root/usr/bin/etcd" --version 2>/dev/null | awk '/etcd Version/{print $3}')"
    echo "source_sha256_16 $shash"
    echo "# package versions"
    cat "$APT_DIR/versions.txt"
  } > "$BIN_DIR.tmp/VERSIONS"
  rm -rf "$BIN_DIR"; mv "$BIN_DIR.tmp" "$BIN_DIR"
  # Keep only the newest few builds.
  ls -dt "$CACHE"/kube-[0-9a-f]* 2>/dev/null | tail -n +4 | xargs -r rm -rf
  log "built $BIN_DIR"
}

# ---------------------------------------------------------------- processes
pid_alive() { # pidfile expected-binary-name
  local f=$STATE/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # guard against a recycled pid
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { # first free port from $1
  local p=$1
  while ! port_free "$p"; do p=$((p + 1)); [ $p -lt $(($1 + 200)) ] || die "no free port near $1"; done
  echo "$p"
}

gen_certs() {
  local pki=$STATE/pki
  [ -f "$pki/admin.crt" ] && return
  log "generating certificates (X.509 v3) in $pki"
  mkdir -p "$pki"; chmod 700 "$pki"
  (
    cd "$pki"
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=s3grant-testbed-ca" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' > server.ext
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > client.ext
    openssl req -new -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=127.0.0.1" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 3650 -extfile server.ext 2>/dev/null
    openssl req -new -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=s3grant-admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
    rm -f ./*.csr
    chmod 600 ./*.key
  ) || die "openssl failed"
}

write_kubeconfig() {
  local pki=$STATE/pki b64="base64 -w0"
  cat > "$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: s3grant-testbed
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $($b64 < "$pki/ca.crt")
users:
- name: s3grant-admin
  user:
    client-certificate-data: $($b64 < "$pki/admin.crt")
    client-key-data: $($b64 < "$pki/admin.key")
contexts:
- name: s3grant-testbed
  context: {cluster: s3grant-testbed, user: s3grant-admin, namespace: default}
current-context: s3grant-testbed
EOF
  chmod 600 "$STATE/kubeconfig"
  cat > "$STATE/kube.env" <<EOF
export KUBECONFIG=$STATE/kubeconfig
export S3GRANT_KUBE_SERVER=https://127.0.0.1:$APISERVER_PORT
EOF
}

readyz() {
  local pki=$STATE/pki
  curl -sf --max-time 3 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null 2>&1
}

load_ports() { [ -f "$STATE/ports.env" ] && . "$STATE/ports.env"; }

up() {
  install
  mkdir -p "$STATE"
  gen_certs
  if pid_alive etcd etcd && pid_alive apiserver "$BIN_NAME"; then
    load_ports
    if readyz; then
      write_kubeconfig
      log "already running on https://127.0.0.1:$APISERVER_PORT"
      [ "$BIN_DIR" = "${RUNNING_BIN_DIR:-}" ] \
        || log "note: the running server is an older build; run 'kube.sh down' then 'up' to use the new one"
      return
    fi
  fi
  # Something is half up (or stale pid files): start clean.
  down_quiet

  ETCD_PORT=$(free_port 23790)
  ETCD_PEER_PORT=$(free_port $((ETCD_PORT + 1)))
  APISERVER_PORT=${S3GRANT_KUBE_PORT:-$(free_port 16443)}
  port_free "$APISERVER_PORT" || die "port $APISERVER_PORT is in use"
  printf 'ETCD_PORT=%s\nETCD_PEER_PORT=%s\nAPISERVER_PORT=%s\nRUNNING_BIN_DIR=%s\n' \
    "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$BIN_DIR" > "$STATE/ports.env"

  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  rm -rf "$STATE/etcd-data"
  setsid "$BIN_DIR/etcd" --name s3grant-testbed --data-dir "$STATE/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "s3grant-testbed=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "" --unsafe-no-fsync --log-level warn \
    > "$STATE/etcd.log" 2>&1 < /dev/null &
  echo $! > "$STATE/etcd.pid"
  local i
  for i in $(seq 1 100); do
    curl -sf --max-time 1 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break
    pid_alive etcd etcd || { tail -20 "$STATE/etcd.log" >&2; die "etcd exited"; }
    sleep 0.1
  done

  start_apiserver ">"
  if ! wait_apiserver_ready; then
    down_quiet
    die "API server not ready (see logs above)"
  fi
  write_kubeconfig
  log "ready: $(cat "$STATE/kube.env" | head -1)"
}

# Starts the API server from $BIN_DIR on $APISERVER_PORT against etcd on $ETCD_PORT;
# $1 is ">" (new log) or ">>" (append: a restart keeps the log of the previous run).
start_apiserver() {
  log "starting $BIN_NAME on https://127.0.0.1:$APISERVER_PORT"
  local logfile=$STATE/apiserver.log
  if [ "$1" = ">>" ]; then echo "--- kube.sh restart $(date -u +%Y-%m-%dT%H:%M:%S.%NZ)" >> "$logfile"; else : > "$logfile"; fi
  setsid "$BIN_DIR/$BIN_NAME" --etcd-servers "http://127.0.0.1:$ETCD_PORT" --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$STATE/pki/server.crt" --tls-private-key-file "$STATE/pki/server.key" \
    --client-ca-file "$STATE/pki/ca.crt" \
    >> "$logfile" 2>&1 < /dev/null &
  echo $! > "$STATE/apiserver.pid"
}

# Waits for /readyz (S3GRANT_KUBE_READY_TIMEOUT); on failure prints the logs' tails, returns 1.
wait_apiserver_ready() {
  local timeout=${S3GRANT_KUBE_READY_TIMEOUT:-90} start=$SECONDS
  until readyz; do
    if ! pid_alive apiserver "$BIN_NAME" || [ $((SECONDS - start)) -ge "$timeout" ]; then
      echo "--- $STATE/etcd.log (tail)" >&2; tail -15 "$STATE/etcd.log" >&2 || true
      echo "--- $STATE/apiserver.log (tail)" >&2; tail -30 "$STATE/apiserver.log" >&2 || true
      log "API server not ready after $((SECONDS - start)) s"
      return 1
    fi
    sleep 0.1
  done
}

now_ms() { date +%s%3N; }

# Whether pid $1 still runs (a zombie waiting for init to reap it does not: kill -0
# succeeds on one, for over a second here).
proc_running() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# Stops the API server (only) and starts it again on the same port, certificates and
# etcd (its data kept). Needs a running testbed: it does not install or build anything.
restart() {
  load_ports || die "no $STATE/ports.env: run '$0 up' first"
  pid_alive etcd etcd || die "etcd is not running: run '$0 up' first"
  [ -n "${RUNNING_BIN_DIR:-}" ] && [ -x "$RUNNING_BIN_DIR/$BIN_NAME" ] \
    || die "no API server binary recorded in $STATE/ports.env: run '$0 up' first"
  BIN_DIR=$RUNNING_BIN_DIR   # the build that was running, not whatever is newest
  local signal=${S3GRANT_KUBE_RESTART_SIGNAL:-TERM} pid i stopped_ms ready_ms
  case "$signal" in TERM|KILL) ;; *) die "S3GRANT_KUBE_RESTART_SIGNAL must be TERM or KILL";; esac
  stopped_ms=$(now_ms)
  if pid_alive apiserver "$BIN_NAME"; then
    pid=$(cat "$STATE/apiserver.pid")
    log "stopping $BIN_NAME (pid $pid, SIG$signal)"
    kill "-$signal" "$pid" 2>/dev/null || true
    for i in $(seq 1 200); do proc_running "$pid" || break; sleep 0.05; done
    if proc_running "$pid"; then log "still running after 10 s: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
    for i in $(seq 1 100); do proc_running "$pid" || break; sleep 0.05; done
  else
    log "the API server was not running; starting it"
  fi
  rm -f "$STATE/apiserver.pid"
  # The port must be free again before the new process binds it.
  for i in $(seq 1 100); do port_free "$APISERVER_PORT" && break; sleep 0.05; done
  port_free "$APISERVER_PORT" || die "port $APISERVER_PORT still in use after the API server stopped"
  local pause=${S3GRANT_KUBE_RESTART_DOWN_S:-0}
  if [ "$pause" != 0 ]; then log "staying down for $pause s"; sleep "$pause"; fi
  local started_ms; started_ms=$(now_ms)
  start_apiserver ">>"
  wait_apiserver_ready || die "API server not ready after the restart (see logs above; '$0 up' starts a fresh testbed)"
  ready_ms=$(now_ms)
  local down_ms=$((ready_ms - stopped_ms))
  log "restarted (pid $(cat "$STATE/apiserver.pid")); down for $((down_ms / 1000)).$(printf '%03d' $((down_ms % 1000))) s ($((started_ms - stopped_ms)) ms stopping, $((ready_ms - started_ms)) ms to /readyz)"
  # stdout, for scripts: the pid and the downtime
  echo "restarted pid=$(cat "$STATE/apiserver.pid") down_ms=$down_ms"
}

# Compacts etcd at its current revision through the v3 HTTP/JSON gateway: every
# resourceVersion before it is gone, so a watch resumed from one gets 410 Gone.
compact() {
  load_ports || die "no $STATE/ports.env: run '$0 up' first"
  pid_alive etcd etcd || die "etcd is not running: run '$0 up' first"
  local url=http://127.0.0.1:$ETCD_PORT answer revision
  # key "\0" with range_end "\0" = every key; count_only: the header is what we want
  answer=$(curl -sf --max-time 5 -X POST "$url/v3/kv/range" -d '{"key":"AA==","range_end":"AA==","count_only":true}') \
    || die "etcd range on $url failed"
  revision=$(printf '%s' "$answer" | sed -n 's/.*"revision":"\([0-9]*\)".*/\1/p')
  [ -n "$revision" ] || die "no revision in etcd's answer: $answer"
  answer=$(curl -s --max-time 30 -X POST "$url/v3/kv/compaction" -d "{\"revision\":\"$revision\",\"physical\":true}")
  case "$answer" in
    *'"error"'*|*'"code"'*)
      # compacting at an already compacted revision is not a failure
      printf '%s' "$answer" | grep -q 'has been compacted' || die "etcd compaction at $revision failed: $answer" ;;
  esac
  log "etcd compacted at revision $revision"
  echo "compacted revision=$revision"
}

stop_pid() { # name expected-binary
  local f=$STATE/$1.pid pid i
  if pid_alive "$1" "$2"; then
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down_quiet() {
  stop_pid apiserver "$BIN_NAME"
  stop_pid etcd etcd
  rm -rf "$STATE/etcd-data"
}

down() {
  [ -d "$STATE" ] || { log "nothing to stop"; return; }
  down_quiet
  rm -f "$STATE/kube.env" "$STATE/kubeconfig"
  log "stopped; etcd data and kubeconfig removed (certificates and logs kept in $STATE)"
}

status() {
  local rc=0
  load_ports || true
  if pid_alive etcd etcd; then echo "etcd: running (pid $(cat "$STATE/etcd.pid"), port ${ETCD_PORT:-?})"
  else echo "etcd: not running"; rc=1; fi
  if pid_alive apiserver "$BIN_NAME"; then echo "apiserver: running (pid $(cat "$STATE/apiserver.pid"), https://127.0.0.1:${APISERVER_PORT:-?})"
  else echo "apiserver: not running"; rc=1; fi
  if [ -n "${APISERVER_PORT:-}" ] && [ -f "$STATE/pki/ca.crt" ] && readyz; then echo "readyz: ok"
  else echo "readyz: not answering"; rc=1; fi
  return $rc
}

case "${1:-}" in
  install) install; log "binaries in $BIN_DIR" ;;
  up) up ;;
  down) down ;;
  status) status ;;
  env) [ -f "$STATE/kube.env" ] || die "no $STATE/kube.env: run '$0 up' first"; cat "$STATE/kube.env" ;;
  restart) restart ;;
  compact) compact ;;
  *) echo "usage: $0 install|up|down|status|env|restart|compact" >&2; exit 2 ;;
esac
