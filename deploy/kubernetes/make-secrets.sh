#!/usr/bin/env bash
# Make the mutual-TLS material for tlscap in Kubernetes and print the two Secrets the
# manifests refer to, as YAML on stdout (nothing is sent to a cluster):
#
#   deploy/kubernetes/make-secrets.sh [PKI_DIR] | kubectl apply -f -
#
#   tlscap-collector-tls   tls.crt, tls.key: the collector's server certificate
#                          (names: tlscap-collector.<ns>.svc[.cluster.local], plus
#                          localhost/127.0.0.1 for `kubectl port-forward`);
#                          ca.crt: the CA agents and consumers must be signed by
#   tlscap-agent-tls       tls.crt, tls.key: the agents' client certificate, identity
#                          tlscap://agent/* (one Secret for every node of a
#                          DaemonSet). With the collector's token-review (the
#                          default manifests) it only opens the TLS connection: each
#                          agent's node comes from its ServiceAccount token. Without
#                          token-review it may send records of any node. Never read.
#                          ca.crt: the CA that signed the collector's certificate
#
# PKI_DIR (default ./pki) keeps the CA key (0600) and a consumer certificate for
# `tlscap tail` (consumer.crt, identity tlscap://consumer/consumer: may read, never send); keep it out of version control. Re-running reuses what exists there
# (`tlscap certs` keeps existing certificates; FORCE=1 reissues the leaf certificates).
#
# Environment: NAMESPACE (default tlscap), CLUSTER_DOMAIN (default cluster.local),
# TLSCAP (the tlscap command, default: tlscap on PATH, else the repo's .venv),
# KUBECTL (default kubectl).
set -euo pipefail

pki="${1:-pki}"
namespace="${NAMESPACE:-tlscap}"
cluster_domain="${CLUSTER_DOMAIN:-cluster.local}"
kubectl="${KUBECTL:-kubectl}"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -n ${TLSCAP:-} ]]; then
    tlscap="$TLSCAP"
elif command -v tlscap >/dev/null 2>&1; then
    tlscap=tlscap
elif [[ -x $repo/.venv/bin/tlscap ]]; then
    tlscap="$repo/.venv/bin/tlscap"
else
    echo "make-secrets.sh: no tlscap command (run \`make setup\` or set TLSCAP=...)" >&2
    exit 1
fi
command -v "$kubectl" >/dev/null 2>&1 || {
    echo "make-secrets.sh: $kubectl not found (set KUBECTL=...)" >&2
    exit 1
}

service="tlscap-collector"
force=()
[[ ${FORCE:-0} == 1 ]] && force=(--force)

# tlscap certs reports what it wrote on stdout; stdout here is the YAML, so send that
# report to stderr.
"$tlscap" certs --dir "$pki" "${force[@]}" \
    --host "$service.$namespace.svc" \
    --host "$service.$namespace.svc.$cluster_domain" \
    --host "$service.$namespace" \
    --host localhost --host 127.0.0.1 \
    --agent-node '*' --consumer consumer >&2

secret() { # name cert key
    "$kubectl" create secret generic "$1" --namespace "$namespace" \
        --from-file=tls.crt="$pki/$2" --from-file=tls.key="$pki/$3" \
        --from-file=ca.crt="$pki/ca.crt" \
        --dry-run=client -o yaml
}

secret tlscap-collector-tls collector.crt collector.key
echo ---
secret tlscap-agent-tls agent-any-node.crt agent-any-node.key
