"""The coordinator's directory: what `fedclimb coordinator init` writes and `start`/`run` read.

Layout (all paths relative to the directory, so it can be moved or backed up whole)::

    coordinator.yaml   address hospitals dial, subject-alt-names, insecure flag, paths
    pki/ca.crt         the federation's CA certificate: the one file that travels to hospitals
    pki/ca.key         0600         pki/server.crt, pki/server.key (0600): the SuperLink's TLS
    flwr/              FLWR_HOME of the flwr CLI (config.toml with the [superlink.fedclimb] connection)
    federation.yaml    the fedclimb run configuration to edit (preset, domains, rounds, min_hospitals)
    hospitals/         NAME.pub: an admitted hospital's public key (the file stem is its name)
    state.db           the SuperLink's database (runs, registered hospitals)
    runs/              one folder per federation run (checkpoints, events, server log)
    logs/              superlink.log
    registered.json    NAME -> node id, written by `coordinator start`
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.files import write_text_atomic
from common.pki import load_ca, new_ca, new_server_certificate, split_address

__all__ = ["CoordinatorDir", "CoordinatorSettings", "CoordinatorError", "init_coordinator", "load_settings",
           "write_flwr_config", "CONNECTION", "HOSPITAL_NAME", "LOOPBACK_NAMES", "insecure_warning"]

CONNECTION = "fedclimb"
SETTINGS_FILE = "coordinator.yaml"
# A hospital's name: the stem of DIR/hospitals/NAME.pub (also used in logs and file names).
HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Always in the server certificate: the coordinator's own flwr CLI and Flower's SuperExec
# reach the SuperLink over loopback.
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


class CoordinatorError(RuntimeError):
    """The coordinator directory is missing or unusable (the message says what to do)."""


@dataclass(frozen=True)
class CoordinatorDir:
    """Every path of a coordinator directory."""

    root: Path

    @property
    def settings(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.pki / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.pki / "server.key"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def federation(self) -> Path:
        return self.root / "federation.yaml"

    @property
    def hospitals(self) -> Path:
        return self.root / "hospitals"

    @property
    def database(self) -> Path:
        return self.root / "state.db"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def registered(self) -> Path:
        return self.root / "registered.json"

    @property
    def started(self) -> Path:
        """When the running SuperLink started (written by `coordinator start`)."""
        return self.logs / "superlink.json"


@dataclass
class CoordinatorSettings:
    """``coordinator.yaml``."""

    address: str
    sans: list[str] = field(default_factory=list)
    insecure: bool = False
    # The interface the SuperLink binds: the address's IP, or every interface for a host name.
    listen: str = ""

    @property
    def host(self) -> str:
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        return split_address(self.address)[1]

    @property
    def local_address(self) -> str:
        """Where the coordinator's own flwr CLI reaches the SuperLink."""
        listen = ipaddress.ip_address(self.listen)
        if listen.is_unspecified or listen.is_loopback:
            return f"127.0.0.1:{self.port}" if listen.version == 4 else f"[::1]:{self.port}"
        return self.address


def default_listen(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return "0.0.0.0"  # a host name: every interface (the name may resolve to any of them)


def _settings_text(s: CoordinatorSettings) -> str:
    body = yaml.safe_dump(
        {
            "address": s.address,
            "listen": s.listen,
            "sans": list(s.sans),
            "insecure": s.insecure,
            "paths": {"ca_cert": "pki/ca.crt", "ca_key": "pki/ca.key", "server_cert": "pki/server.crt",
                      "server_key": "pki/server.key", "flwr_home": "flwr", "federation": "federation.yaml",
                      "hospitals": "hospitals", "database": "state.db", "runs": "runs", "logs": "logs",
                      "registered": "registered.json"},
        },
        sort_keys=False,
    )
    return (
        "# Written by `fedclimb coordinator init`; read by `coordinator start` and `coordinator run`.\n"
        "# address: what hospitals dial (HOST:PORT); listen: the interface the SuperLink binds;\n"
        "# sans: names in the server certificate. Paths are relative to this folder.\n" + body
    )


FEDERATION_TEMPLATE = """\
# The federation's run configuration, read by `fedclimb coordinator run DIR`.
# Any key of the fedclimb configuration can be set here (docs/config.md);
# `key=value` words on the command line win over this file.
defaults:
  - model: tiny          # presets under configs/model: tiny, smollm2-135m, qwen2_5_vl_7b
  - privacy: dp
  - aggregation: exact
federation:
  rounds: 3
  # The federation's domain names (the hospitals' CLIMB dataset folders, e.g. [chexpert, ptbxl]):
  # needed for domain-aware weighting.
  domains: []
  # Hospitals to wait for before round 1 (default: every hospital admitted in hospitals/).
  # min_hospitals: 2
  # Seconds to wait for them (then go on with those connected).
  connect_timeout_s: 600
  # Seconds one round may take before the missing replies are given up.
  round_timeout_s: 21600
train:
  steps: 20
"""


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "/" in name:
        raise CoordinatorError(f"--san {name!r} is not a host name or IP address")


def init_coordinator(root: Path, address: str, sans: list[str], *, force: bool = False,
                     insecure: bool = False) -> tuple[CoordinatorDir, CoordinatorSettings]:
    """Create (or, with ``force``, re-key) a coordinator directory.

    Without ``force`` an existing key or certificate is an error and nothing is written.
    ``federation.yaml`` is written only when missing (it is the operator's to edit).
    """
    d = CoordinatorDir(Path(root).resolve())
    try:
        host, _ = split_address(address)
    except ValueError as exc:
        raise CoordinatorError(f"--address: {exc}") from None
    for name in sans:
        _check_name(name)
    names = list(dict.fromkeys([host, *sans, *LOOPBACK_NAMES]))
    settings = CoordinatorSettings(address=address, sans=names, insecure=insecure, listen=default_listen(host))
    existing = [p for p in (d.ca_cert, d.ca_key, d.server_cert, d.server_key) if p.exists()]
    if existing and not force and not insecure:
        raise CoordinatorError(
            f"{d.root} already holds keys ({', '.join(str(p.relative_to(d.root)) for p in existing)}); "
            "refusing to overwrite them. Pass --force to issue a new server certificate (e.g. for new "
            "--san names; the CA is kept, so hospitals need nothing new)."
        )
    for folder in (d.root, d.pki, d.flwr_home, d.hospitals, d.runs, d.logs):
        folder.mkdir(parents=True, exist_ok=True)
    d.pki.chmod(0o700)
    if not insecure:  # --insecure: no TLS, so no keys (existing ones are left alone)
        try:
            if d.ca_cert.exists() or d.ca_key.exists():  # only reached with --force: keep the CA
                ca = load_ca(d.ca_cert, d.ca_key)
            else:
                ca = new_ca(d.ca_cert, d.ca_key)
            new_server_certificate(ca, d.server_cert, d.server_key, names, force=force)
        except (OSError, ValueError) as exc:  # KeyExistsError is an OSError
            raise CoordinatorError(
                f"{exc}. The CA in {d.pki} cannot be used; to start a new CA move {d.pki} away and run "
                "init again (every hospital then needs the new ca.crt)."
            ) from None
    write_text_atomic(d.settings, _settings_text(settings))
    if not d.federation.exists():
        write_text_atomic(d.federation, FEDERATION_TEMPLATE)
    write_flwr_config(d, settings)
    return d, settings


def load_settings(root: Path) -> tuple[CoordinatorDir, CoordinatorSettings]:
    """Read ``DIR/coordinator.yaml``; CoordinatorError naming the problem."""
    d = CoordinatorDir(Path(root).resolve())
    if not d.settings.is_file():
        raise CoordinatorError(f"{d.settings} not found: create the directory with "
                               f"`fedclimb coordinator init {root} --address HOST:PORT`")
    try:
        raw: Any = yaml.safe_load(d.settings.read_text(encoding="utf-8"))
        s = CoordinatorSettings(address=str(raw["address"]), sans=[str(x) for x in raw.get("sans") or []],
                                insecure=bool(raw.get("insecure", False)),
                                listen=str(raw.get("listen") or ""))
        host = split_address(s.address)[0]
        s.listen = s.listen or default_listen(host)
        ipaddress.ip_address(s.listen)
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise CoordinatorError(f"{d.settings}: unreadable ({exc}); fix it or run `fedclimb coordinator init` "
                               "again") from None
    if not s.insecure:
        missing = [p for p in (d.ca_cert, d.server_cert, d.server_key) if not p.is_file()]
        if missing:
            raise CoordinatorError(f"{', '.join(map(str, missing))} missing: run `fedclimb coordinator init "
                                   f"{root} --address {s.address} --force` to make new keys")
        if d.ca_key.is_file():  # the CA key may live offline; the SuperLink needs only its certificate
            try:
                load_ca(d.ca_cert, d.ca_key)
            except ValueError as exc:
                raise CoordinatorError(str(exc)) from None
    return d, s


def write_flwr_config(d: CoordinatorDir, s: CoordinatorSettings) -> Path:
    """``DIR/flwr/config.toml``: the ``[superlink.fedclimb]`` connection of the flwr CLI.

    Rewritten by every start and run, so the CA path stays right if the directory moved.
    """
    d.flwr_home.mkdir(parents=True, exist_ok=True)
    tls = "insecure = true\n" if s.insecure else f"root-certificates = {_toml_str(str(d.ca_cert))}\n"
    text = (
        "# Written by fedclimb coordinator init/start/run (rewritten each time).\n"
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\naddress = {_toml_str(s.local_address)}\n{tls}"
    )
    path = d.flwr_home / "config.toml"
    write_text_atomic(path, text)
    return path


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def insecure_warning() -> str:
    return ("WARNING: this federation runs WITHOUT TLS and WITHOUT hospital authentication (--insecure): "
            "anyone who can reach the port can read the traffic and join as a hospital. Use it only on a "
            "closed test network.")
