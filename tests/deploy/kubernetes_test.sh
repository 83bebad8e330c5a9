#!/usr/bin/env bash
# issue 20: the Kubernetes manifests (deploy/kubernetes: Kustomize base + example overlay) render
# with `kubectl kustomize` and the output validates against the Kubernetes OpenAPI schemas
# (kubernetes-validate from PyPI, strict: unknown fields are errors) for two Kubernetes versions;
# the rendered objects are checked for what operators rely on (probes, volumes, Secret
# references rewritten to the generated names, resource requests, non-root, read-only root).
#   tests/deploy/kubernetes_test.sh FEDTUNE_BINARY        (exit 77 = skipped with the reason)
set -euo pipefail
bin="$1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${FEDTUNE_K8S_VENV:-$HOME/.cache/fedtune-k8s-venv}"
skip() { echo "SKIPPED: $*"; exit 77; }
command -v kubectl > /dev/null || skip "no kubectl (scripts/setup.sh installs Debian's kubernetes-client)"
[ -x "$venv/bin/kubernetes-validate" ] || skip "no $venv/bin/kubernetes-validate (scripts/setup.sh installs it)"
dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
cp -r "$here/deploy/kubernetes" "$dir/k8s"
pki="$dir/k8s/example/pki"
"$bin" provision -o "$pki" --host fedtune-coordinator --host fedtune-coordinator.fedtune.svc \
  --worker node-1 --worker node-2 > /dev/null
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$pki/http.token"
grep -Eqx '[A-Za-z0-9._-]{16,}' "$pki/http.token" || { echo "FAILED: the documented token command makes a token the status server refuses"; exit 1; }
cp "$pki"/workers/* "$pki/"
kubectl kustomize "$dir/k8s/example" > "$dir/rendered.yaml" 2> "$dir/kustomize.log" || { cat "$dir/kustomize.log"; exit 1; }
echo "rendered with $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
for v in 1.29.0 1.34.0; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$dir/rendered.yaml"
  echo "kubernetes-validate --strict -k $v: OK"
done
# The cross-machine simulation recipe (deploy/kubernetes/simulate): coordinator Job + Service and
# an Indexed Job with one pod per simulated client.
spki="$dir/k8s/simulate/pki"
"$bin" provision -o "$spki" --host fedtune-sim --clients 2 > /dev/null
cp "$spki"/workers/* "$spki/"
kubectl kustomize "$dir/k8s/simulate" > "$dir/simulate.yaml" 2> "$dir/kustomize-sim.log" || { cat "$dir/kustomize-sim.log"; exit 1; }
"$venv/bin/kubernetes-validate" --strict --quiet -k 1.34.0 "$dir/simulate.yaml"
python3 - "$dir/simulate.yaml" "$dir/k8s/simulate/sim.yaml" <<'PY'
import sys, yaml
docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
clients = yaml.safe_load(open(sys.argv[2]))["clients"]
job = docs[("Job", "fedtune-sim-clients")]["spec"]
assert job["completionMode"] == "Indexed" and job["completions"] == clients == job["parallelism"], (job, clients)
assert "--client" in " ".join(job["template"]["spec"]["containers"][0]["args"])
assert "--serve" in docs[("Job", "fedtune-sim-coordinator")]["spec"]["template"]["spec"]["containers"][0]["args"]
print(f"simulate recipe: {len(docs)} objects, Indexed Job with {clients} client pods: OK")
PY
echo "kubernetes-validate --strict (simulate recipe): OK"

# The validator must refuse what the API server would: an unknown field in the StatefulSet spec.
python3 -c "import sys, yaml; d = list(yaml.safe_load_all(open(sys.argv[1]))); [x['spec'].__setitem__('replica', 1) for x in d if x and x['kind'] == 'StatefulSet']; yaml.safe_dump_all(d, open(sys.argv[2], 'w'))" "$dir/rendered.yaml" "$dir/broken.yaml"
if "$venv/bin/kubernetes-validate" --strict --quiet -k 1.34.0 "$dir/broken.yaml" > "$dir/broken.log" 2>&1; then
  echo "FAILED: an unknown field passed validation"; exit 1
fi
echo "an unknown field is refused: $(grep -o "Additional properties.*" "$dir/broken.log" | head -1)"
python3 - "$dir/rendered.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
kinds = sorted(k for k, _ in by)
print("objects:", ", ".join(f"{k}/{n}" for k, n in sorted(by)))
assert all(d["metadata"].get("namespace") == "fedtune" for d in docs if d["kind"] != "Namespace")
secrets = {n for k, n in by if k == "Secret"}
cms = {n for k, n in by if k == "ConfigMap"}
sts = by[("StatefulSet", "fedtune-coordinator")]
ds = by[("DaemonSet", "fedtune-worker")]
svc = by[("Service", "fedtune-coordinator")]
assert ("PersistentVolumeClaim", "fedtune-models") in by
for w in (sts, ds):
    spec = w["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    for v in spec["volumes"]:  # generated names (hash suffix) are referenced, not the base names
        if "secret" in v: assert v["secret"]["secretName"] in secrets, v
        if "configMap" in v: assert v["configMap"]["name"] in cms, v
c = sts["spec"]["template"]["spec"]["containers"][0]
for p in ("startupProbe", "livenessProbe", "readinessProbe"):
    assert c[p]["httpGet"]["path"] in ("/healthz", "/readyz") and c[p]["httpGet"]["port"] == "http", p
assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
assert any(m["mountPath"] == "/var/lib/fedtune" for m in c["volumeMounts"])
assert {p["port"] for p in svc["spec"]["ports"]} == {7443, 9090}
assert svc["spec"]["selector"] == sts["spec"]["template"]["metadata"]["labels"] | svc["spec"]["selector"]
assert ds["spec"]["template"]["spec"]["nodeSelector"] == {"fedtune.dev/worker": "true"}
coord_secret = next(by[("Secret", n)] for n in secrets if n.startswith("fedtune-coordinator-pki"))
worker_secret = next(by[("Secret", n)] for n in secrets if n.startswith("fedtune-worker-pki"))
assert "coordinator.key" in coord_secret["data"] and "coordinator.key" not in worker_secret["data"]
assert {"node-1.key", "node-1.token", "ca.pem"} <= set(worker_secret["data"])
print("rendered objects: OK")
PY
