"""Keys and certificates of a real federation (Python ``cryptography`` only, no openssl).

- :func:`new_node_keypair`: a hospital's SuperNode authentication key, ECDSA P-384, the
  private key in OpenSSH format (0600) and the public key as one OpenSSH line (the file a
  hospital sends to the coordinator).
- :func:`new_ca`: the federation's certificate authority (private key 0600).
- :func:`new_server_certificate`: the SuperLink's TLS certificate, signed by the CA, whose
  subject-alt-names cover every name or IP address the hospitals dial.

No function here overwrites a key or certificate unless asked to (``force=True``): a
replaced CA or node key silently locks every hospital out.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["KeyExistsError", "CertificateAuthority", "new_node_keypair", "new_ca", "load_ca",
           "new_server_certificate", "san_entries", "split_address"]

CURVE = ec.SECP384R1()
CA_DAYS = 3650
SERVER_DAYS = 825
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


class KeyExistsError(FileExistsError):
    """A key or certificate is already there and ``force`` was not given."""


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise KeyExistsError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; refusing to overwrite "
            "(a replaced key locks out everyone who trusts the old one). Pass --force to replace it on purpose."
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the first byte (never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # the umask may have removed bits from a public file
    os.replace(tmp, path)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_node_keypair(private_path: Path, public_path: Path, comment: str, force: bool = False) -> None:
    """Write a SuperNode authentication key pair (ECDSA P-384, OpenSSH format).

    Parameters
    ----------
    private_path
        The private key, OpenSSH format, mode 0600 (``flower-supernode
        --auth-supernode-private-key``). It never leaves the hospital.
    public_path
        One OpenSSH line ``ecdsa-sha2-nistp384 AAAA... comment`` (``flwr supernode
        register``), the file sent to the coordinator.
    comment
        Appended to the public line (e.g. the hospital's name); must be one line.
    force
        Replace existing files; without it an existing file raises :class:`KeyExistsError`.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if "\n" in comment or "\r" in comment:
        raise ValueError(f"the key comment must be one line, got {comment!r}")
    if private_path.resolve() == public_path.resolve():
        raise ValueError(f"the private and public key paths are the same file: {private_path}")
    _refuse_existing([private_path, public_path], force)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = public + (b" " + comment.strip().encode() if comment.strip() else b"") + b"\n"
    _write(private_path, private, PRIVATE_MODE)
    _write(public_path, line, PUBLIC_MODE)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) -> (host, port); ValueError naming the problem."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be HOST:PORT (e.g. coordinator.example.org:8000), got {address!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    """Subject-alt-names: an IP entry for each IP literal, a DNS entry otherwise (deduplicated, in order)."""
    out: list[x509.GeneralName] = []
    for name in names:
        name = name.strip()
        if not name:
            raise ValueError("an empty subject-alt-name was given")
        ip = _ip(name)
        entry: x509.GeneralName = x509.IPAddress(ip) if ip is not None else x509.DNSName(name)
        if entry not in out:
            out.append(entry)
    return out


@dataclass
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedclimb federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_ca(cert_path: Path, key_path: Path, common_name: str = "fedclimb federation CA",
           force: bool = False, days: int = CA_DAYS) -> CertificateAuthority:
    """Create the federation's CA: ``cert_path`` (travels to hospitals) and ``key_path`` (0600)."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    _refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _private_pem(key), PRIVATE_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return CertificateAuthority(key, cert)


def load_ca(cert_path: Path, key_path: Path) -> CertificateAuthority:
    """Read a CA written by :func:`new_ca`."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    return CertificateAuthority(key, cert)


def new_server_certificate(ca: CertificateAuthority, cert_path: Path, key_path: Path, names: Sequence[str],
                           force: bool = False, days: int = SERVER_DAYS) -> x509.Certificate:
    """The SuperLink's certificate for ``names`` (host names and IP addresses), signed by ``ca``.

    ``names[0]`` is also the subject's common name. The key (0600) goes to ``key_path``.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    if not names:
        raise ValueError("the server certificate needs at least one name (the host hospitals dial)")
    sans = san_entries(names)
    _refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0].strip())).issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA384())
    )
    _write(key_path, _private_pem(key), PRIVATE_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return cert
