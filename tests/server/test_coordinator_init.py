"""`fedclimb coordinator init`: the directory, its keys and the flwr connection."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from common.config import load_config
from server.coordinator import CoordinatorError, init_coordinator, load_settings
from simulation.cli import main as cli_main


def _sans(cert_path: Path) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)], san.get_values_for_type(x509.DNSName)


def test_init_writes_the_layout_with_private_keys_0600(tmp_path: Path) -> None:
    d, s = init_coordinator(tmp_path / "coord", "10.0.0.5:9092", ["coord.example.org", "192.168.1.7"])

    for path in (d.ca_cert, d.ca_key, d.server_cert, d.server_key, d.settings, d.federation,
                 d.flwr_home / "config.toml"):
        assert path.is_file(), path
    assert d.hospitals.is_dir() and d.runs.is_dir() and d.logs.is_dir()
    assert stat.S_IMODE(d.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.server_key.stat().st_mode) == 0o600
    ips, dns = _sans(d.server_cert)
    assert ips == ["10.0.0.5", "192.168.1.7", "127.0.0.1"]  # the address's IP, --san, loopback
    assert dns == ["coord.example.org", "localhost"]
    x509.load_pem_x509_certificate(d.server_cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(d.ca_cert.read_bytes()))
    assert s.listen == "10.0.0.5" and s.port == 9092


def test_a_host_name_address_listens_everywhere_and_the_cli_dials_loopback(tmp_path: Path) -> None:
    d, s = init_coordinator(tmp_path / "c", "coord.example.org:8000", [])
    assert s.listen == "0.0.0.0"
    conn = tomllib.loads((d.flwr_home / "config.toml").read_text())["superlink"]
    assert conn["default"] == "fedclimb"
    assert conn["fedclimb"] == {"address": "127.0.0.1:8000", "root-certificates": str(d.ca_cert)}
    assert _sans(d.server_cert)[1] == ["coord.example.org", "localhost"]


def test_init_refuses_to_overwrite_keys_and_force_keeps_the_ca(tmp_path: Path) -> None:
    d, _ = init_coordinator(tmp_path / "c", "127.0.0.1:9092", [])
    ca, ca_key, cert = d.ca_cert.read_bytes(), d.ca_key.read_bytes(), d.server_cert.read_bytes()

    with pytest.raises(CoordinatorError, match="refusing to overwrite"):
        init_coordinator(tmp_path / "c", "127.0.0.1:9092", ["new.example.org"])
    assert d.server_cert.read_bytes() == cert

    init_coordinator(tmp_path / "c", "127.0.0.1:9092", ["new.example.org"], force=True)
    assert d.ca_cert.read_bytes() == ca and d.ca_key.read_bytes() == ca_key  # hospitals keep their ca.crt
    assert d.server_cert.read_bytes() != cert
    assert "new.example.org" in _sans(d.server_cert)[1]


def test_init_keeps_an_edited_federation_yaml(tmp_path: Path) -> None:
    d, _ = init_coordinator(tmp_path / "c", "127.0.0.1:9092", [])
    d.federation.write_text("federation:\n  rounds: 7\n")
    init_coordinator(tmp_path / "c", "127.0.0.1:9092", [], force=True)
    assert d.federation.read_text() == "federation:\n  rounds: 7\n"


def test_the_federation_template_is_a_valid_run_configuration(tmp_path: Path) -> None:
    d, _ = init_coordinator(tmp_path / "c", "127.0.0.1:9092", [])
    cfg = load_config(d.federation)
    assert cfg.model.source == "tiny" and cfg.federation.rounds == 3 and cfg.privacy.enabled


def test_insecure_init_makes_no_keys_and_an_insecure_connection(tmp_path: Path) -> None:
    d, s = init_coordinator(tmp_path / "c", "127.0.0.1:9092", [], insecure=True)
    assert s.insecure and not d.pki.joinpath("ca.key").exists()
    conn = tomllib.loads((d.flwr_home / "config.toml").read_text())["superlink"]["fedclimb"]
    assert conn == {"address": "127.0.0.1:9092", "insecure": True}
    assert load_settings(d.root)[1].insecure


@pytest.mark.parametrize("address", ["coordinator", "coordinator:", "10.0.0.1:99999"])
def test_a_bad_address_is_refused(tmp_path: Path, address: str) -> None:
    with pytest.raises(CoordinatorError, match="HOST:PORT"):
        init_coordinator(tmp_path / "c", address, [])
    assert not (tmp_path / "c").exists()


def test_load_settings_names_the_missing_directory_and_keys(tmp_path: Path) -> None:
    with pytest.raises(CoordinatorError, match="coordinator init"):
        load_settings(tmp_path / "nowhere")
    d, _ = init_coordinator(tmp_path / "c", "127.0.0.1:9092", [])
    d.server_key.unlink()
    with pytest.raises(CoordinatorError, match="server.key missing"):
        load_settings(d.root)


def test_cli_init_twice_exits_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["coordinator", "init", str(tmp_path / "c"), "--address", "127.0.0.1:9092"]) == 0
    out = capsys.readouterr().out
    assert "send " in out and "ca.crt" in out
    assert cli_main(["coordinator", "init", str(tmp_path / "c"), "--address", "127.0.0.1:9092"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
