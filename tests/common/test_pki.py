"""common/pki.py: node keys, the CA and the SuperLink certificate, checked property by property."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.pki import (KeyExistsError, load_ca, new_ca, new_node_keypair, new_server_certificate, san_entries,
                        split_address)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_node_keypair_is_p384_openssh_with_private_key_0600(tmp_path: Path) -> None:
    """The private key is OpenSSH ECDSA P-384 (what flwr loads), 0600; the public line matches it."""
    new_node_keypair(tmp_path / "node_key", tmp_path / "alpha.pub", "alpha")

    private_bytes = (tmp_path / "node_key").read_bytes()
    public_line = (tmp_path / "alpha.pub").read_text()
    assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert _mode(tmp_path / "node_key") == 0o600
    key = load_ssh_private_key(private_bytes, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public_line.startswith("ecdsa-sha2-nistp384 ") and public_line.endswith(" alpha\n")
    public = load_ssh_public_key(public_line.encode())
    assert public.public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def test_node_keypair_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    """An existing key stays byte for byte unless force=True; with force it is replaced."""
    priv, pub = tmp_path / "node_key", tmp_path / "alpha.pub"
    new_node_keypair(priv, pub, "alpha")
    before = priv.read_bytes()

    with pytest.raises(KeyExistsError, match="--force"):
        new_node_keypair(priv, pub, "alpha")
    assert priv.read_bytes() == before
    with pytest.raises(KeyExistsError):  # only the public file there: still refused
        priv.unlink()
        new_node_keypair(priv, pub, "alpha")
    assert not priv.exists()

    new_node_keypair(priv, pub, "alpha", force=True)
    assert priv.read_bytes() != before and _mode(priv) == 0o600


def test_node_keypair_rejects_a_multiline_comment(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one line"):
        new_node_keypair(tmp_path / "k", tmp_path / "k.pub", "a\nb")
    assert not (tmp_path / "k").exists()


def test_san_entries_ip_literals_become_ip_sans() -> None:
    """IPv4/IPv6 literals -> IPAddress, names -> DNSName, duplicates dropped, order kept."""
    sans = san_entries(["127.0.0.1", "coord.example.org", "::1", "127.0.0.1"])
    assert sans == [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("coord.example.org"),
                    x509.IPAddress(ipaddress.ip_address("::1"))]


@pytest.mark.parametrize("address,expected", [("10.0.0.5:8000", ("10.0.0.5", 8000)),
                                              ("coord.example.org:443", ("coord.example.org", 443)),
                                              ("[::1]:9000", ("::1", 9000))])
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["coord", "coord:", ":8000", "coord:0", "coord:70000", "coord:http"])
def test_split_address_rejects(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_address(address)


def test_server_certificate_is_signed_by_the_ca_and_names_every_san(tmp_path: Path) -> None:
    """Issuer = CA subject, signature verifies with the CA key, SANs and serverAuth present, key 0600."""
    ca = new_ca(tmp_path / "ca.crt", tmp_path / "ca.key")
    cert = new_server_certificate(ca, tmp_path / "server.crt", tmp_path / "server.key",
                                  ["10.1.2.3", "coord.example.org", "localhost"])

    assert _mode(tmp_path / "ca.key") == 0o600 and _mode(tmp_path / "server.key") == 0o600
    loaded = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    assert loaded == cert and cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc


def test_load_ca_round_trips_and_catches_a_mismatched_key(tmp_path: Path) -> None:
    ca = new_ca(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert load_ca(tmp_path / "ca.crt", tmp_path / "ca.key").cert == ca.cert
    new_ca(tmp_path / "other.crt", tmp_path / "other.key")
    with pytest.raises(ValueError, match="not the key of"):
        load_ca(tmp_path / "ca.crt", tmp_path / "other.key")


def test_ca_and_certificate_refuse_to_overwrite(tmp_path: Path) -> None:
    ca = new_ca(tmp_path / "ca.crt", tmp_path / "ca.key")
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(KeyExistsError):
        new_ca(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert (tmp_path / "ca.key").read_bytes() == before
    new_server_certificate(ca, tmp_path / "s.crt", tmp_path / "s.key", ["localhost"])
    with pytest.raises(KeyExistsError):
        new_server_certificate(ca, tmp_path / "s.crt", tmp_path / "s.key", ["localhost"])


def _tls_handshake(tmp_path: Path, ca_file: Path, server_hostname: str) -> str:
    """Serve one TLS handshake on loopback with server.crt; return the client's verdict."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname):
                return "ok"
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message
    finally:
        thread.join(timeout=10)
        listener.close()


def test_a_tls_client_trusting_only_the_ca_accepts_the_server_for_its_sans(tmp_path: Path) -> None:
    """Real handshakes: the CA + SAN name pass; a name not in the SANs and a foreign CA fail."""
    ca = new_ca(tmp_path / "ca.crt", tmp_path / "ca.key")
    new_server_certificate(ca, tmp_path / "server.crt", tmp_path / "server.key", ["127.0.0.1", "localhost"])
    new_ca(tmp_path / "foreign.crt", tmp_path / "foreign.key")

    assert _tls_handshake(tmp_path, tmp_path / "ca.crt", "127.0.0.1") == "ok"
    assert _tls_handshake(tmp_path, tmp_path / "ca.crt", "localhost") == "ok"
    assert "mismatch" in _tls_handshake(tmp_path, tmp_path / "ca.crt", "other.example.org").lower()
    assert "unable to get local issuer" in _tls_handshake(tmp_path, tmp_path / "foreign.crt", "127.0.0.1")
