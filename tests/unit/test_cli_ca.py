"""`tlscap ca export` run as a real command (python -m agent)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509

REPO = Path(__file__).resolve().parents[2]


def export(ca_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "ca", "export", "--ca-dir", str(ca_dir), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def only_certificate(pem: str) -> x509.Certificate:
    assert pem.count("-----BEGIN CERTIFICATE-----") == 1
    assert pem.count("-----END CERTIFICATE-----") == 1
    assert pem.startswith("-----BEGIN CERTIFICATE-----\n")
    assert pem.endswith("-----END CERTIFICATE-----\n")
    certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    assert len(certs) == 1
    return certs[0]


def test_export_creates_and_prints_a_ca(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    result = export(ca_dir)
    assert result.returncode == 0, result.stderr
    cert = only_certificate(result.stdout)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True
    for hint in ("SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "keytool"):
        assert hint in result.stderr
    assert "created a new CA" in result.stderr
    assert str(ca_dir) in result.stderr
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert (ca_dir / "ca.crt").read_text() == result.stdout


def test_second_export_prints_the_same_ca(tmp_path: Path) -> None:
    first = export(tmp_path)
    second = export(tmp_path)
    assert first.returncode == second.returncode == 0
    assert second.stdout == first.stdout
    assert "created a new CA" not in second.stderr
    assert "SSL_CERT_FILE" in second.stderr


def test_quiet(tmp_path: Path) -> None:
    result = export(tmp_path, "--quiet")
    assert result.returncode == 0
    assert result.stderr == ""
    only_certificate(result.stdout)
    again = export(tmp_path, "-q")
    assert (again.stdout, again.stderr) == (result.stdout, "")


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    made = export(tmp_path / "full", "-q")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "ca.crt").write_text(made.stdout)
    result = export(lone)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tlscap: error: ")
    assert "ca.key" in lines[0]
    assert not (lone / "ca.key").exists()  # nothing was overwritten or created
    assert (lone / "ca.crt").read_text() == made.stdout
