"""Certificates for the node runtime: CA creation, device certificates, loading checks."""

from __future__ import annotations

import ipaddress
import stat

import pytest

pytest.importorskip("cryptography")

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pl.errors import P2PLError
from p2pl.node import certs


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_init_ca_writes_key_0600_and_ca_cert(tmp_path):
    paths = certs.init_ca(tmp_path / "ca", name="test-ca", days=30)
    assert paths.key.name == "ca.key" and paths.cert.name == "ca.crt"
    assert _mode(paths.key) == 0o600
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test-ca"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    cert.verify_directly_issued_by(cert)  # self-signed
    assert not list((tmp_path / "ca").glob("*.tmp"))  # atomic writes leave nothing behind


def test_init_ca_refuses_to_overwrite_unless_forced(tmp_path):
    first = certs.init_ca(tmp_path)
    before = first.cert.read_bytes()
    with pytest.raises(P2PLError, match="already exists"):
        certs.init_ca(tmp_path)
    assert first.cert.read_bytes() == before
    certs.init_ca(tmp_path, force=True)
    assert first.cert.read_bytes() != before


def test_issue_device_cert(tmp_path):
    certs.init_ca(tmp_path / "ca")
    paths = certs.issue_device_cert(
        tmp_path / "ca", "dev-07", tmp_path / "dev", hosts=["127.0.0.1", "10.0.0.7", "node7.lan"]
    )
    assert paths.key == tmp_path / "dev" / "dev-07.key"
    assert _mode(paths.key) == 0o600
    assert paths.ca_cert.read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
    assert not (tmp_path / "dev" / "ca.key").exists()  # the CA key never goes to a device
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-07"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"dev-07", "localhost", "node7.lan"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.7"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    tls = certs.load_tls_config(tmp_path / "dev", "dev-07")
    assert tls.device_id == "dev-07"
    assert b"BEGIN CERTIFICATE" in tls.ca_cert and b"PRIVATE KEY" in tls.key
    assert "PRIVATE" not in repr(tls)
    assert certs.certificate_common_name(tls.cert) == "dev-07"
    assert certs.load_ca_cert(tmp_path / "dev") == tls.ca_cert


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "dev 1", "é", "x" * 65, "a\n"])
def test_bad_device_ids_refused(tmp_path, bad):
    certs.init_ca(tmp_path)
    with pytest.raises(P2PLError, match="bad device id"):
        certs.issue_device_cert(tmp_path, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_device_id_charset_accepted():
    for ok in ["a", "dev-01", "Node_1.x", "x" * 64]:
        assert certs.check_device_id(ok) == ok


def test_missing_ca_and_bad_inputs(tmp_path):
    with pytest.raises(P2PLError, match="no CA"):
        certs.issue_device_cert(tmp_path / "nope", "dev-1", tmp_path / "out")
    certs.init_ca(tmp_path / "ca")
    with pytest.raises(P2PLError, match="bad host"):
        certs.issue_device_cert(tmp_path / "ca", "dev-1", tmp_path / "out", hosts=["bad host!"])
    with pytest.raises(P2PLError, match="positive integer"):
        certs.issue_device_cert(tmp_path / "ca", "dev-1", tmp_path / "out", days=0)
    with pytest.raises(P2PLError, match="not found"):
        certs.load_tls_config(tmp_path / "out", "dev-1")
    (tmp_path / "ca" / "ca.crt").write_text("garbage")
    with pytest.raises(P2PLError, match="not a PEM certificate"):
        certs.issue_device_cert(tmp_path / "ca", "dev-1", tmp_path / "out")


def test_load_tls_config_checks_cn_key_and_issuer(tmp_path):
    certs.init_ca(tmp_path / "ca")
    certs.init_ca(tmp_path / "other")
    certs.issue_device_cert(tmp_path / "ca", "dev-a", tmp_path / "d")
    certs.issue_device_cert(tmp_path / "ca", "dev-b", tmp_path / "d")
    # a certificate renamed to another device's name: CN mismatch (and key mismatch)
    (tmp_path / "d" / "dev-c.crt").write_bytes((tmp_path / "d" / "dev-a.crt").read_bytes())
    (tmp_path / "d" / "dev-c.key").write_bytes((tmp_path / "d" / "dev-a.key").read_bytes())
    with pytest.raises(P2PLError, match="is for device 'dev-a'"):
        certs.load_tls_config(tmp_path / "d", "dev-c")
    (tmp_path / "d" / "dev-c.key").write_bytes((tmp_path / "d" / "dev-b.key").read_bytes())
    with pytest.raises(P2PLError, match="does not match"):
        certs.load_tls_config(tmp_path / "d", "dev-c")
    with pytest.raises(P2PLError, match="not signed by the CA"):
        certs.load_tls_config(tmp_path / "d", "dev-a", ca_cert=tmp_path / "other" / "ca.crt")
