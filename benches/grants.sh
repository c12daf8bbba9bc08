#!/usr/bin/env bash
# Measures the operator on the local testbed and prints numbers (no pass/fail):
#   - time from applying N IAM-user grants (moto) to all Ready, and the same for N STS
#     grants (Ceph RGW);
#   - AWS calls per grant: to issue, and for a reconcile with nothing to change;
#   - the operator's memory (RSS) with N grants;
#   - time from deleting them to every grant gone and every IAM user removed.
# Usage: benches/grants.sh [N]   (default 50; uses target/release/s3grant when present,
# else the debug build; BUILD=release to build it first)
set -euo pipefail

N="${1:-50}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

tests/testbed.sh up >/dev/null
set -a; . .testbed/env; set +a
if [[ "${BUILD:-}" == release ]]; then cargo build --quiet --release --bin s3grant; fi
S3GRANT="${CARGO_TARGET_DIR:-target}/release/s3grant"
[[ -x "$S3GRANT" ]] || { cargo build --quiet --bin s3grant; S3GRANT="${CARGO_TARGET_DIR:-target}/debug/s3grant"; }
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null

NS="bench-$(date +%s)"
CLASS_IAM="$NS-iam"
CLASS_STS="$NS-sts"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
kubectl create namespace "$NS" >/dev/null
kubectl -n "$NS" create secret generic moto --from-literal=AWS_ACCESS_KEY_ID="$S3GRANT_TEST_MOTO_ACCESS_KEY_ID" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$S3GRANT_TEST_MOTO_SECRET_ACCESS_KEY" >/dev/null
kubectl -n "$NS" create secret generic rgw --from-literal=AWS_ACCESS_KEY_ID="$S3GRANT_TEST_RGW_ACCESS_KEY_ID" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$S3GRANT_TEST_RGW_SECRET_ACCESS_KEY" >/dev/null
kubectl apply -f - >/dev/null <<EOF
apiVersion: s3grant.io/v1alpha1
kind: S3GrantClass
metadata: {name: $CLASS_IAM}
spec:
  backend: {endpoint: $S3GRANT_TEST_MOTO_ENDPOINT, iamPath: /s3grant/$NS/, credentialsSecretRef: {namespace: $NS, name: moto}}
  buckets: [$S3GRANT_TEST_MOTO_BUCKET]
---
apiVersion: s3grant.io/v1alpha1
kind: S3GrantClass
metadata: {name: $CLASS_STS}
spec:
  backend: {endpoint: $S3GRANT_TEST_RGW_ENDPOINT, roleArn: $S3GRANT_TEST_RGW_ROLE_ARN, credentialsSecretRef: {namespace: $NS, name: rgw}}
  buckets: [$S3GRANT_TEST_RGW_BUCKET]
EOF

LOG="$(mktemp)"
AWS_EC2_METADATA_DISABLED=true "$S3GRANT" run --watch-namespace "$NS" --admin-addr "127.0.0.1:$PORT" 2>"$LOG" &
OPERATOR=$!
trap 'kill $OPERATOR 2>/dev/null || true; kubectl delete s3grantclass $CLASS_IAM $CLASS_STS --wait=false >/dev/null 2>&1 || true' EXIT
until curl -sf "127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.2; done

aws_calls() { curl -s "127.0.0.1:$PORT/metrics" | awk '/^s3grant_aws_calls_total\{/ { n += $NF } END { print n + 0 }'; }
ready_count() { kubectl -n "$NS" get s3g -l "bench=$1" -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True || true; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

grants() { # kind class bucket extra
  for i in $(seq 1 "$N"); do
    printf 'apiVersion: s3grant.io/v1alpha1\nkind: S3Grant\nmetadata: {name: %s-%d, labels: {bench: %s}}\nspec: {className: %s, bucket: %s, prefix: %s/%d/%s}\n---\n' \
      "$1" "$i" "$1" "$2" "$3" "$1" "$i" "$4"
  done
}

measure() { # kind class bucket extra
  local calls0 t0
  calls0=$(aws_calls); t0=$(now)
  grants "$@" | kubectl -n "$NS" apply -f - >/dev/null
  until [[ "$(ready_count "$1")" -ge "$N" ]]; do sleep 0.2; done
  echo "$1: $N grants applied to all Ready in $(since "$t0") s; $(( ($(aws_calls) - calls0) / N )) AWS calls per grant to issue"
}

echo "s3grant $("$S3GRANT" --version | cut -d' ' -f2) ($S3GRANT), $N grants of each kind, $(nproc) cores"
measure iam "$CLASS_IAM" "$S3GRANT_TEST_MOTO_BUCKET" ""
measure sts "$CLASS_STS" "$S3GRANT_TEST_RGW_BUCKET" ", duration: 15m"

calls0=$(aws_calls)
reconciles0=$(curl -s "127.0.0.1:$PORT/metrics" | awk '/^s3grant_reconciles_total/ { print $NF }')
kubectl -n "$NS" annotate s3g --all bench/touched="$(date +%s)" --overwrite >/dev/null
until [[ "$(curl -s "127.0.0.1:$PORT/metrics" | awk '/^s3grant_reconciles_total/ { print $NF }')" -ge $(( reconciles0 + 2 * N )) ]]; do sleep 0.2; done
echo "a reconcile of all $(( 2 * N )) grants with nothing to change: $(( $(aws_calls) - calls0 )) AWS calls (5 per IAM-user grant, 0 per fresh STS grant expected)"
echo "operator memory with $(( 2 * N )) grants: $(awk '/VmRSS/ { printf "%.1f MB", $2 / 1024 }' /proc/$OPERATOR/status) RSS"

t0=$(now)
kubectl -n "$NS" delete s3g --all --wait=false >/dev/null
until [[ -z "$(kubectl -n "$NS" get s3g -o name)" ]]; do sleep 0.2; done
echo "delete: all $(( 2 * N )) grants gone (IAM users, keys and Secrets removed) in $(since "$t0") s"
