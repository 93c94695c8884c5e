"""Certificates for the networked runtime: a private CA and one mutual-TLS certificate per device.

Every ``p2pl node`` process authenticates itself to its neighbours with a certificate whose
common name (CN) is its device id, signed by a CA that the experiment owner created once with
:func:`init_ca`. The transport (:mod:`p2pl.node.transport`) requires client certificates, checks
that the CN equals the ``sender`` claimed in each message header, and verifies that the server it
dials presents the certificate of the device it meant to reach (a DNS SAN equal to the device id).

Layout on disk::

    ca_dir/ca.key        CA private key (0600) -- keep it off the devices
    ca_dir/ca.crt        self-signed CA certificate
    out_dir/ca.crt       copy of the CA certificate (what a device needs to verify peers)
    out_dir/<id>.key     device private key (0600)
    out_dir/<id>.crt     device certificate: CN=<id>, SAN = DNS:<id>, DNS:localhost, given hosts/IPs,
                         extended key usage serverAuth + clientAuth

Keys are EC P-256 (fast to generate, small handshakes). All files are written atomically
(temporary file in the same directory, then ``os.replace``). Every failure a user can cause
raises :class:`~p2pl.errors.P2PLError` with a one-line message.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pl import atomic
from p2pl.errors import P2PLError

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "DEVICE_ID_PATTERN",
    "CertPaths",
    "TlsConfig",
    "certificate_common_name",
    "check_device_id",
    "init_ca",
    "issue_device_cert",
    "load_ca_cert",
    "load_tls_config",
]

CA_KEY_NAME = "ca.key"
CA_CERT_NAME = "ca.crt"
#: Device ids this CA has issued, one a line: TLS host names ignore case, so ids must not clash.
ISSUED_NAME = "issued.txt"
DEVICE_ID_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
_DEVICE_ID_RE = re.compile(rf"\A{DEVICE_ID_PATTERN}\Z")
_HOSTNAME_RE = re.compile(r"\A[A-Za-z0-9_.-]{1,253}\Z")
DEFAULT_CA_DAYS = 3650
DEFAULT_DEVICE_DAYS = 825


def check_device_id(device_id: object) -> str:
    """Return ``device_id`` if it is a valid device id (``[A-Za-z0-9_.-]{1,64}``), else raise P2PLError.

    Device ids become certificate CNs, DNS SANs and file names, so they are deliberately plain.
    They are compared case-sensitively in message headers, but TLS host-name checks are
    case-insensitive: keep ids unique ignoring case.
    """
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.match(device_id):
        raise P2PLError(f"bad device id {device_id!r}: use 1-64 characters from A-Z a-z 0-9 _ . - (e.g. 'dev-07')")
    return device_id


@dataclass(frozen=True)
class CertPaths:
    """Where a key pair ended up: ``key`` (private, 0600), ``cert``, and the CA certificate to trust."""

    key: Path
    cert: Path
    ca_cert: Path


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes for one device's mutual-TLS identity, ready for ``p2pl.node.framing.tls_context``.

    ``ca_cert`` is the root every peer must chain to; ``cert``/``key`` are this device's
    certificate and private key; ``device_id`` is the CN inside ``cert``. Build it with
    :func:`load_tls_config` (which checks all of that) rather than by hand.
    """

    device_id: str
    ca_cert: bytes
    cert: bytes
    key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"TlsConfig(device_id={self.device_id!r}, key=<hidden>)"


# ----------------------------------------------------------------------------------- helpers


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _valid_from(cert: x509.Certificate) -> _dt.datetime:
    if hasattr(cert, "not_valid_before_utc"):  # cryptography >= 42
        return cert.not_valid_before_utc
    return cert.not_valid_before.replace(tzinfo=_dt.timezone.utc)


def _valid_until(cert: x509.Certificate) -> _dt.datetime:
    if hasattr(cert, "not_valid_after_utc"):  # cryptography >= 42
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=_dt.timezone.utc)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    atomic.write_bytes(path, data, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise P2PLError(
            f"{what} not found at {path}; create it with 'p2pl certs init' and 'p2pl certs issue DEVICE' first"
        ) from None
    except OSError as exc:
        raise P2PLError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise P2PLError(f"{what} {path} is not a PEM certificate; regenerate it") from None


def _load_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, what), password=None)
    except (ValueError, TypeError):
        raise P2PLError(f"{what} {path} is not an unencrypted PEM private key; regenerate it") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise P2PLError(f"{what} {path} is not an EC key; regenerate it with 'p2pl certs'")
    return key


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise P2PLError(f"certificate validity days must be a positive integer, got {days!r}")
    return days


def certificate_common_name(cert_pem: bytes) -> str:
    """The subject CN of a PEM certificate (raises P2PLError if there is none)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise P2PLError("not a PEM certificate") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise P2PLError("certificate has no common name")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


# ---------------------------------------------------------------------------------------- CA


def init_ca(directory: Path, name: str = "p2pl-ca", days: int = DEFAULT_CA_DAYS, force: bool = False) -> CertPaths:
    """Create a self-signed CA (``ca.key`` 0600, ``ca.crt``) in ``directory``.

    Refuses to overwrite an existing CA (that would orphan every device certificate) unless
    ``force=True``. The CA certificate has ``CA:true, pathlen:0`` and key usage keyCertSign/cRLSign.
    """
    directory = Path(directory)
    _check_days(days)
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise P2PLError(f"bad CA name {name!r}: use 1-64 characters")
    key_path, cert_path = directory / CA_KEY_NAME, directory / CA_CERT_NAME
    if not force and (key_path.exists() or cert_path.exists()):
        raise P2PLError(
            f"a CA already exists in {directory}; add --force to 'p2pl certs init' to replace it "
            "(certificates it issued stop working)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        _atomic_write(key_path, _key_pem(key), 0o600)
        _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _atomic_write(directory / ISSUED_NAME, b"", 0o644)  # a new CA has issued nothing yet
    except OSError as exc:
        raise P2PLError(f"cannot write the CA into {directory}: {exc.strerror or exc}") from None
    return CertPaths(key=key_path, cert=cert_path, ca_cert=cert_path)


def _issued(ca_dir: Path) -> list[str]:
    """Ids this CA issued (an older CA without the list: none recorded)."""
    try:
        return [line for line in (ca_dir / ISSUED_NAME).read_text(encoding="utf-8").splitlines() if line]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise P2PLError(f"cannot read {ca_dir / ISSUED_NAME}: {exc}") from None


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    if not (ca_dir / CA_KEY_NAME).exists() or not (ca_dir / CA_CERT_NAME).exists():
        raise P2PLError(
            f"no CA in {ca_dir} (need {CA_KEY_NAME} and {CA_CERT_NAME}); create one with "
            f"'p2pl certs init --dir {ca_dir}' or point --ca at an existing one"
        )
    cert = _load_cert(ca_dir / CA_CERT_NAME, "CA certificate")
    key = _load_key(ca_dir / CA_KEY_NAME, "CA key")
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise P2PLError(f"{ca_dir / CA_KEY_NAME} does not match {ca_dir / CA_CERT_NAME}; recreate the CA")
    return cert, key


def _san_entries(device_id: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    dns: list[str] = [device_id, "localhost"]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for host in hosts:
        if not isinstance(host, str) or not host:
            raise P2PLError(f"bad host {host!r} for the certificate; give an IP address or a host name")
        try:
            ips.append(ipaddress.ip_address(host))
            continue
        except ValueError:
            pass
        if not _HOSTNAME_RE.match(host):
            raise P2PLError(f"bad host {host!r} for the certificate; give an IP address or a host name")
        dns.append(host)
    out: list[x509.GeneralName] = []
    for d in dict.fromkeys(dns):
        out.append(x509.DNSName(d))
    for ip in dict.fromkeys(ips):
        out.append(x509.IPAddress(ip))
    return out


def issue_device_cert(
    ca_dir: Path,
    device_id: str,
    out_dir: Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = DEFAULT_DEVICE_DAYS,
) -> CertPaths:
    """Issue ``<device_id>.key``/``<device_id>.crt`` in ``out_dir``, signed by the CA in ``ca_dir``.

    The certificate has CN=device_id, SAN = DNS:device_id + DNS:localhost + every host in ``hosts``
    (IP literals become IP SANs), extended key usage serverAuth+clientAuth, and is valid for
    ``days``. The CA certificate is copied to ``out_dir/ca.crt`` (never the CA key) so that
    ``out_dir`` is everything one device needs. Re-issuing replaces the device's files atomically.
    """
    check_device_id(device_id)
    _check_days(days)
    if isinstance(hosts, str):
        hosts = [hosts]
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    issued = _issued(Path(ca_dir))
    clash = [d for d in issued if d.lower() == device_id.lower() and d != device_id]
    if clash:
        raise P2PLError(
            f"device id {device_id!r} differs only in case from {clash[0]!r}, which this CA already issued; "
            "TLS host names ignore case, so choose another id"
        )
    out_dir = Path(out_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + _dt.timedelta(days=days), _valid_until(ca_cert))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san_entries(device_id, hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_path, cert_path, ca_copy = (
        out_dir / f"{device_id}.key",
        out_dir / f"{device_id}.crt",
        out_dir / CA_CERT_NAME,
    )
    try:
        _atomic_write(key_path, _key_pem(key), 0o600)
        _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        src = Path(ca_dir) / CA_CERT_NAME
        if not ca_copy.exists() or not ca_copy.samefile(src):
            _atomic_write(ca_copy, src.read_bytes(), 0o644)
        if device_id not in issued:
            text = "".join(f"{d}\n" for d in [*issued, device_id])
            _atomic_write(Path(ca_dir) / ISSUED_NAME, text.encode(), 0o644)
    except OSError as exc:
        raise P2PLError(f"cannot write the certificate for {device_id} into {out_dir}: {exc}") from None
    return CertPaths(key=key_path, cert=cert_path, ca_cert=ca_copy)


# ------------------------------------------------------------------------------------ loading


def load_ca_cert(directory: Path) -> bytes:
    """PEM bytes of ``directory/ca.crt`` (the root a TLS context trusts)."""
    path = Path(directory) / CA_CERT_NAME
    data = _read(path, "CA certificate")
    _load_cert(path, "CA certificate")
    return data


def load_tls_config(cert_dir: Path, device_id: str, ca_cert: Path | None = None) -> TlsConfig:
    """Load and check one device's TLS identity from ``cert_dir`` (as written by issue_device_cert).

    Checks, so that a misconfiguration fails here with one clear line instead of as an opaque
    handshake error later: the key matches the certificate, the certificate's CN is ``device_id``,
    it is signed by the CA (``ca_cert`` or ``cert_dir/ca.crt``) and is currently valid.
    """
    check_device_id(device_id)
    cert_dir = Path(cert_dir)
    ca_path = Path(ca_cert) if ca_cert is not None else cert_dir / CA_CERT_NAME
    ca_pem = _read(ca_path, "CA certificate")
    cert_path, key_path = cert_dir / f"{device_id}.crt", cert_dir / f"{device_id}.key"
    cert_pem = _read(cert_path, f"certificate of {device_id}")
    key_pem = _read(key_path, f"key of {device_id}")
    ca = _load_cert(ca_path, "CA certificate")
    cert = _load_cert(cert_path, f"certificate of {device_id}")
    key = _load_key(key_path, f"key of {device_id}")
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise P2PLError(f"{key_path} does not match {cert_path}; re-issue the device certificate")
    cn = certificate_common_name(cert_pem)
    if cn != device_id:
        raise P2PLError(f"{cert_path} is for device {cn!r}, not {device_id!r}; re-issue it")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise P2PLError(f"{cert_path} is not signed by the CA in {ca_path}; re-issue it") from None
    now = _now()
    if not _valid_from(cert) <= now <= _valid_until(cert):
        raise P2PLError(f"{cert_path} is not valid now (expired or not yet valid); re-issue it")
    return TlsConfig(device_id=device_id, ca_cert=ca_pem, cert=cert_pem, key=key_pem)
