#!/usr/bin/env bash
# Vagrant "peer" VM: serve TLS with `openssl s_server` on ADDRESS:PORT as a systemd
# service, with a self-signed certificate for ADDRESS (made once, kept in
# /etc/tlscap-peer). openssl comes from scripts/bootstrap.sh, which provisions the VM
# first; this script installs nothing.
#
#   peer-tls-server.sh ADDRESS PORT
#
# From the lab VM:  curl -sk https://ADDRESS:PORT/   or   openssl s_client -connect ADDRESS:PORT
# (the certificate is self-signed: -k, or copy /etc/tlscap-peer/server.crt over and
# pass it with --cacert).
set -euo pipefail

address="${1:?usage: peer-tls-server.sh ADDRESS PORT}"
port="${2:?usage: peer-tls-server.sh ADDRESS PORT}"
dir=/etc/tlscap-peer

install -d -m 0700 "$dir"
if [[ ! -s $dir/server.crt || ! -s $dir/server.key ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 397 \
        -subj "/CN=tlscap-peer" \
        -addext "subjectAltName=IP:$address,DNS:tlscap-peer" \
        -keyout "$dir/server.key" -out "$dir/server.crt" 2>/dev/null
fi

# -www answers every request with a status page: enough plaintext to see captured.
cat >/etc/systemd/system/tlscap-peer.service <<UNIT
[Unit]
Description=tlscap lab TLS peer (openssl s_server on $address:$port)
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/bin/openssl s_server -accept $address:$port -www -cert $dir/server.crt -key $dir/server.key
Restart=always

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable --now tlscap-peer.service
systemctl restart tlscap-peer.service
echo "peer: openssl s_server listening on $address:$port (certificate $dir/server.crt)"
