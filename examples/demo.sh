#!/usr/bin/env bash
# The main job, on a local default it starts itself: the testbed (a Kubernetes API
# server, moto for IAM, Ceph RGW for STS), the s3grant operator, and two grants:
#   - an IAM-user grant (moto): a put inside its prefix works, one outside is denied;
#   - an STS grant (RGW, which enforces session policies): the same, with a session token.
# Secret values are masked in what it prints. The testbed keeps running afterwards
# (`tests/testbed.sh down` stops it); the operator is stopped on exit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting the testbed (first run installs and builds it: a few minutes)"
tests/testbed.sh up
set -a; . .testbed/env; set +a
STATE="${S3GRANT_TESTBED_DIR:-$REPO/.testbed}"
PYTHON="$(tests/testbed/moto.sh python)"

say "building s3grant and installing its CRDs"
cargo build --quiet --bin s3grant
S3GRANT="${CARGO_TARGET_DIR:-$REPO/target}/debug/s3grant"
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for=condition=Established crd/s3grants.s3grant.io crd/s3grantclasses.s3grant.io --timeout=30s >/dev/null

say "the platform team: backend keys in s3grant-system, two classes, a tenant namespace"
kubectl create namespace s3grant-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create namespace tenant-a --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace tenant-a s3grant.io/tenant=true --overwrite >/dev/null
kubectl -n s3grant-system create secret generic moto-admin \
  --from-literal=AWS_ACCESS_KEY_ID="$S3GRANT_TEST_MOTO_ACCESS_KEY_ID" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$S3GRANT_TEST_MOTO_SECRET_ACCESS_KEY" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n s3grant-system create secret generic rgw-admin \
  --from-literal=AWS_ACCESS_KEY_ID="$S3GRANT_TEST_RGW_ACCESS_KEY_ID" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$S3GRANT_TEST_RGW_SECRET_ACCESS_KEY" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -f - <<EOF
apiVersion: s3grant.io/v1alpha1
kind: S3GrantClass
metadata:
  name: demo-iam
  annotations: {s3grant.io/is-default-class: "true"}
spec:
  backend:
    endpoint: $S3GRANT_TEST_MOTO_ENDPOINT
    iamPath: /s3grant/demo/
    credentialsSecretRef: {namespace: s3grant-system, name: moto-admin}
  namespaceSelector: {matchLabels: {s3grant.io/tenant: "true"}}
  buckets: [$S3GRANT_TEST_MOTO_BUCKET]
  prefixTemplate: "data/{namespace}/"
---
apiVersion: s3grant.io/v1alpha1
kind: S3GrantClass
metadata: {name: demo-sts}
spec:
  backend:
    endpoint: $S3GRANT_TEST_RGW_ENDPOINT
    roleArn: $S3GRANT_TEST_RGW_ROLE_ARN
    credentialsSecretRef: {namespace: s3grant-system, name: rgw-admin}
  namespaceSelector: {matchLabels: {s3grant.io/tenant: "true"}}
  buckets: [$S3GRANT_TEST_RGW_BUCKET]
  prefixTemplate: "data/{namespace}/"
  maxDuration: 1h
EOF

say "starting the operator (log: $STATE/demo-operator.log)"
"$S3GRANT" run --admin-addr 127.0.0.1:0 >"$STATE/demo-operator.log" 2>&1 &
OPERATOR=$!
trap 'kill "$OPERATOR" 2>/dev/null; wait "$OPERATOR" 2>/dev/null || true' EXIT

say "the tenant applies two grants"
kubectl apply -f - <<EOF
apiVersion: s3grant.io/v1alpha1
kind: S3Grant
metadata: {name: reports, namespace: tenant-a}
spec:
  bucket: $S3GRANT_TEST_MOTO_BUCKET
  prefix: data/tenant-a/reports/
  mode: ReadWrite
---
apiVersion: s3grant.io/v1alpha1
kind: S3Grant
metadata: {name: ingest, namespace: tenant-a}
spec:
  className: demo-sts
  bucket: $S3GRANT_TEST_RGW_BUCKET
  prefix: data/tenant-a/ingest/
  mode: ReadWrite
  duration: 15m
EOF
if ! kubectl -n tenant-a wait --for=condition=Ready s3grant/reports s3grant/ingest --timeout=60s; then
  echo "the grants did not become Ready; the operator's log ends with:" >&2
  tail -20 "$STATE/demo-operator.log" >&2
  exit 1
fi
kubectl -n tenant-a get s3g -o wide

show_secret() {
  say "Secret tenant-a/$1 (secret values masked)"
  kubectl -n tenant-a get secret "$1" -o go-template='{{range $k, $v := .data}}{{$k}}{{"\n"}}{{end}}' |
    while read -r key; do
      value="$(kubectl -n tenant-a get secret "$1" -o go-template="{{index .data \"$key\" | base64decode}}")"
      case "$key" in
        AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|credentials|credential_process.json) value="****** (${#value} characters)" ;;
      esac
      printf '  %-26s %s\n' "$key" "$value"
    done
}

try_puts() {
  local secret="$1" endpoint="$2" bucket="$3"
  say "with the credentials from $secret: one put inside the prefix, one outside"
  kubectl -n tenant-a get secret "$secret" -o json |
    "$PYTHON" "$REPO/examples/put_inside_and_outside.py" "$endpoint" "$bucket" "$4" "$5"
}

show_secret reports-s3
try_puts reports-s3 "$S3GRANT_TEST_MOTO_ENDPOINT" "$S3GRANT_TEST_MOTO_BUCKET" data/tenant-a/reports/demo.txt data/tenant-b/demo.txt
show_secret ingest-s3
try_puts ingest-s3 "$S3GRANT_TEST_RGW_ENDPOINT" "$S3GRANT_TEST_RGW_BUCKET" data/tenant-a/ingest/demo.txt data/tenant-a/reports/demo.txt

say "what the operator recorded"
kubectl -n tenant-a get s3grant reports -o go-template='{{range .status.conditions}}{{.type}}={{.status}} ({{.reason}}): {{.message}}{{"\n"}}{{end}}'
kubectl -n tenant-a get s3grant ingest -o go-template='{{range .status.conditions}}{{.type}}={{.status}} ({{.reason}}): {{.message}}{{"\n"}}{{end}}session expires {{.status.expiresAt}}, re-minted at about two thirds of its life{{"\n"}}'

say "done: the testbed is still up (tests/testbed.sh down stops it)"
