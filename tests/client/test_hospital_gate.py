"""client/app_gate.py's decision, and the command lines `fedclimb hospital start` runs.

The decision fails closed: an unlisted digest, a FAB whose announced hash is not the hash
of its bytes, an empty or unreadable approval list are all refused. The gate module
imports nothing of fedclimb beyond itself (it runs before the FAB is on sys.path).
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from client import app_gate, hospital_start
from client.app_gate import AppRefused, approved_apps, check_fab, state_dir
from common.config import HospitalConfig

FAB = b"PK\x03\x04 some fab bytes"
DIGEST = "sha256:" + hashlib.sha256(FAB).hexdigest()


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hospital.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_an_approved_digest_passes(tmp_path: Path) -> None:
    path = _yaml(tmp_path, f'approved_apps:\n  - "{DIGEST}"\nstate_dir: state\n')
    assert check_fab(FAB, DIGEST[7:], path) == DIGEST
    assert state_dir(path) == tmp_path / "state"


@pytest.mark.parametrize("text", ["approved_apps: []\n", "name: x\n", f'approved_apps: ["sha256:{"0" * 64}"]\n'])
def test_anything_not_listed_is_refused_with_how_to_approve(tmp_path: Path, text: str) -> None:
    path = _yaml(tmp_path, text)
    with pytest.raises(AppRefused) as info:
        check_fab(FAB, DIGEST[7:], path)
    assert f'add "{DIGEST}" to approved_apps in {path}' in str(info.value)


def test_a_fab_announced_under_another_hash_is_refused(tmp_path: Path) -> None:
    path = _yaml(tmp_path, f'approved_apps: ["{DIGEST}"]\n')
    with pytest.raises(AppRefused, match="announced as"):
        check_fab(FAB, "0" * 64, path)


@pytest.mark.parametrize("text", ["approved_apps: {a: 1}\n", "[unclosed\n", "- just a list\n"])
def test_unreadable_settings_refuse(tmp_path: Path, text: str) -> None:
    with pytest.raises(AppRefused):
        approved_apps(_yaml(tmp_path, text))
    with pytest.raises(AppRefused):
        approved_apps(tmp_path / "missing.yaml")


def test_the_gate_imports_nothing_of_the_app() -> None:
    tree = ast.parse(Path(app_gate.__file__).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & set(app_gate.APP_PACKAGES)
    code = ("import sys, client.app_gate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('common', 'client', 'server', 'simulation')))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "['client', 'client.app_gate']"


def test_the_gate_drops_app_modules_before_the_fab_loads() -> None:
    code = ("import sys, common.keys, client.app_gate as g; g._drop_app_modules(); "
            "print([m for m in sys.modules if m.split('.')[0] in g.APP_PACKAGES])")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_supernode_command_lines(tmp_path: Path) -> None:
    h = HospitalConfig(name="st-a", data_root="/d", state_dir="/s", coordinator="link.example:9092",
                       ca_cert="/h/ca.crt", node_key="/h/node_key")
    secure = hospital_start.supernode_argv(h, Path("/h/hospital.yaml"), 40000, Path("/t/secret"), insecure=False)
    assert secure[:3] == ["flower-supernode", "--superlink", "link.example:9092"]
    assert {"--isolation", "process", "--root-certificates", "/h/ca.crt", "--auth-supernode-private-key",
            "/h/node_key", "--superexec-auth-secret-file", "/t/secret"} <= set(secure)
    assert 'hospital-config="/h/hospital.yaml"' in secure and "--insecure" not in secure
    insecure = hospital_start.supernode_argv(h, Path("/h/hospital.yaml"), 40000, Path("/t/s"), insecure=True)
    assert "--insecure" in insecure and "--auth-supernode-private-key" not in insecure


class _Exited:
    """A child that has already exited as a SuperNode that cannot reach the coordinator does."""

    pid = 1

    def __init__(self, name: str, argv: list[str], env: dict[str, str], **_: Any) -> None:
        self.name, self.argv, self.env = name, argv, env
        _Exited.started.append(self)

    def poll(self) -> int:
        return 1  # Flower's exit code 305 is printed; the process status is 1

    def recent_output(self) -> str:
        return "Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n[Errno 111] Connection refused"

    def stop(self, grace: float = 10.0) -> int:
        return 1

    started: list[Any] = []


def test_start_warns_when_insecure_and_says_what_to_check_when_the_supernode_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    h = HospitalConfig(name="st-a", data_root=str(tmp_path), state_dir=str(tmp_path / "state"),
                       coordinator="127.0.0.1:9092", insecure=True)
    monkeypatch.setattr(hospital_start, "_preflight", lambda root, flag: (h, True))
    monkeypatch.setattr(hospital_start, "Child", _Exited)
    assert hospital_start.start_hospital(tmp_path, grace=0.1) == 1
    out = capsys.readouterr().out
    assert "WARNING: insecure mode" in out and "supernode exited with status 1: it could not connect" in out
    supernode, executor = _Exited.started[-2:]
    assert "--insecure" in supernode.argv and executor.argv[0] == "flower-superexec"
    gate = Path(executor.env["PATH"].split(":")[0]) / "flwr-clientapp"
    assert not gate.exists(), "the private folder of the gate is removed when start returns"
    assert executor.env["FLWR_HOME"] == str(tmp_path / "state" / "flwr")


def test_round_line_reports_clamps(tmp_path: Path) -> None:
    from client.round_report import asked_values, round_line
    from client.site import Site
    from common.config import PrivacyConfig, load_config

    h = HospitalConfig(name="st-a", data_root=str(tmp_path), state_dir=str(tmp_path),
                       privacy=PrivacyConfig(enabled=False))
    asked = asked_values(load_config(), {"hp.train.lr": 0.5, "hp.train.steps": True})
    line = round_line(Site("st-a", h, simulated=False), "train", 3, asked, 1234, "ok")
    assert "lr=0.5" in line and f"train.lr 0.5->{h.limits.max_lr:g}" in line
    assert "DP off" in line and "sent 1,234 bytes" in line and line.endswith("status ok")
    # an evaluation reads no training setting: its line names only what it uses
    evaluation = round_line(Site("st-a", h, simulated=False), "evaluate", 3, asked, 0, "ok")
    assert "lr=" not in evaluation and "steps=" not in evaluation and "clamped nothing" in evaluation
    assert f"max_new_tokens={load_config().rollout.max_new_tokens}" in evaluation
