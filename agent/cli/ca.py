"""`tlscap ca export`: the proxy's root CA certificate, and how to make clients trust it.

Proxy mode presents certificates signed by this CA, so clients see the plaintext
endpoints only if they trust it.  Each runtime reads its trust store differently; the
hints printed on stderr (stdout stays pure PEM, for `> tlscap-ca.pem`) cover the common
ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.certs.authority import CA_CERT_FILE, CertificateAuthority, CertificateError
from agent.cli.errors import fail
from agent.fallback.config import DEFAULT_CA_DIR

TRUST_HINTS = """\
# Save it:   tlscap ca export --ca-dir {dir} > tlscap-ca.pem
# Trust it, per runtime (a bundle must hold your usual roots too, so append, not replace):
#   OpenSSL, curl, Go, Ruby:  cat /etc/ssl/certs/ca-certificates.crt tlscap-ca.pem > bundle.pem
#                             SSL_CERT_FILE=$PWD/bundle.pem   (curl: --cacert bundle.pem)
#   Node.js:                  NODE_EXTRA_CA_CERTS=$PWD/tlscap-ca.pem   (added to the defaults)
#   Python requests:          REQUESTS_CA_BUNDLE=$PWD/bundle.pem
#   Java (JDK 9+):            keytool -importcert -noprompt -cacerts -storepass changeit \\
#                               -alias tlscap -file tlscap-ca.pem
#                             (to leave the JDK untouched: import into a copy of its
#                             lib/security/cacerts and pass -Djavax.net.ssl.trustStore=COPY)
#   Debian/Ubuntu system-wide: cp tlscap-ca.pem /usr/local/share/ca-certificates/tlscap.crt
#                             && update-ca-certificates
# Clients that pin their server's certificate will not accept it; tlscap then passes their
# connections through untouched (counted as proxy_pinned_clients in the stats record).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ca", help="the proxy mode's root CA")
    actions = p.add_subparsers(dest="ca_command", required=True)
    export = actions.add_parser(
        "export",
        help="print the CA certificate (PEM) and how to trust it",
        description="Print the proxy's CA certificate on stdout (creating the CA if the "
        "directory has none yet) and, on stderr, how each runtime is made to trust it.",
    )
    export.add_argument(
        "--ca-dir",
        type=Path,
        default=DEFAULT_CA_DIR,
        metavar="DIR",
        help=f"default {DEFAULT_CA_DIR}",
    )
    export.add_argument("-q", "--quiet", action="store_true", help="no trust hints on stderr")
    export.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    export.set_defaults(handler=export_command)


def export_command(args: argparse.Namespace) -> int:
    existed = (args.ca_dir / CA_CERT_FILE).exists()
    try:
        ca = CertificateAuthority.load_or_create(args.ca_dir)
    except (CertificateError, OSError) as exc:
        return fail(f"cannot load or create the CA in {args.ca_dir}: {exc}")
    sys.stdout.write(ca.cert_pem.decode("ascii"))
    sys.stdout.flush()
    if not args.quiet:
        if not existed:
            print(f"# created a new CA in {args.ca_dir} (key stored 0600)", file=sys.stderr)
        print(TRUST_HINTS.format(dir=args.ca_dir), file=sys.stderr, end="")
    return 0
