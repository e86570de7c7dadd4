"""`fedclimb hospital init` and the checks `fedclimb hospital start` runs before starting anything."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from client import hospital_start
from client.hospital_setup import derive_limits, preset_rounds
from client.site import limit_clamps
from common.config import config_dir, load_config, load_hospital_config
from common.fab import installed_app_digest
from common.pki import new_ca
from simulation.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from simulation.synth import generate_federation

    base = tmp_path_factory.mktemp("hinit")
    new_ca(base / "ca.crt", base / "ca.key")
    data = generate_federation(base / "fed", hospitals=1, seed=0, scale=0.25).hospital_roots[0]
    return {"base": base, "ca": base / "ca.crt", "data": data}


def _init(world: dict[str, Path], folder: Path, *extra: str) -> int:
    return main(["hospital", "init", str(folder), "--coordinator", "127.0.0.1:9092", "--ca", str(world["ca"]),
                 "--data", str(world["data"]), *extra])


@pytest.fixture(scope="module")
def initialised(world: dict[str, Path]) -> Path:
    folder = world["base"] / "st-a"
    assert _init(world, folder) == 0
    return folder


def test_init_writes_the_hospital_folder(initialised: Path, world: dict[str, Path]) -> None:
    h = load_hospital_config(initialised / "hospital.yaml")
    assert h.name == "st-a" and h.coordinator == "127.0.0.1:9092"
    assert h.approved_apps == [installed_app_digest()]
    assert Path(h.state_dir) == initialised / "state" and Path(h.state_dir).is_dir()
    assert Path(h.data_root) == world["data"].absolute()
    assert Path(h.ca_cert).read_bytes() == world["ca"].read_bytes()
    assert stat.S_IMODE((initialised / "node_key").stat().st_mode) == 0o600
    public = (initialised / "st-a.pub").read_text(encoding="utf-8").splitlines()
    assert len(public) == 1 and public[0].startswith("ecdsa-sha2-nistp384 ") and public[0].endswith("st-a")
    assert h.privacy.enabled and h.privacy.secure_rng and h.privacy.planned_rounds == preset_rounds()
    assert h.privacy.unit == "patient"  # every synthetic record names its patient
    assert h.limits == derive_limits()


def test_init_prints_the_one_file_to_send(world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder = world["base"] / "st-b"
    assert _init(world, folder, "--name", "st-b", "--state", str(world["base"] / "elsewhere")) == 0
    out = capsys.readouterr().out
    assert f"send this one file to the coordinator: {folder / 'st-b.pub'}" in out
    assert yaml.safe_load((folder / "hospital.yaml").read_text())["state_dir"] == str(world["base"] / "elsewhere")


def test_limits_fit_every_preset_and_the_example_matches_init(initialised: Path) -> None:
    limits = derive_limits()
    for model in sorted(p.stem for p in (config_dir() / "model").glob("*.yaml")):
        for federation in sorted(p.stem for p in (config_dir() / "federation").glob("*.yaml")):
            cfg = load_config(None, [f"model={model}", f"federation={federation}"])
            assert limit_clamps(cfg, limits) == [], (model, federation)
    assert limits.max_lr >= 0.005  # the tiny preset's learning rate is never clamped
    example = load_hospital_config(config_dir() / "hospital.example.yaml")
    assert example.limits == limits and example.privacy.planned_rounds == preset_rounds()
    written = yaml.safe_load((initialised / "hospital.yaml").read_text())
    shown = yaml.safe_load((config_dir() / "hospital.example.yaml").read_text())
    assert set(written) == set(shown) and set(written["privacy"]) == set(shown["privacy"])
    assert set(written["limits"]) == set(shown["limits"])


def test_init_never_overwrites_without_force(initialised: Path, world: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    key = (initialised / "node_key").read_bytes()
    assert _init(world, initialised) == 1
    assert "exist" in capsys.readouterr().err and (initialised / "node_key").read_bytes() == key


def _hand_edited(world: dict[str, Path], folder: Path) -> tuple[bytes, bytes]:
    """A fresh folder whose hospital.yaml was edited by hand: (its text, the node key)."""
    assert _init(world, folder) == 0
    config = folder / "hospital.yaml"
    text = config.read_text(encoding="utf-8")
    edited = text.replace("approved_apps:\n", 'approved_apps:\n  - "sha256:' + "e" * 64 + '"\n', 1)
    edited = edited.replace("max_eval_records: 0", "max_eval_records: 7")
    assert edited.count("sha256:") == 2 and "max_eval_records: 7" in edited
    config.write_text(edited, encoding="utf-8")
    return edited.encode(), (folder / "node_key").read_bytes()


def test_force_makes_a_new_key_and_keeps_hand_edits(world: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "st-f"
    edited, key = _hand_edited(world, folder)
    capsys.readouterr()

    assert _init(world, folder, "--force") == 0

    out = capsys.readouterr().out
    assert (folder / "hospital.yaml").read_bytes() == edited  # approved digests and other edits kept
    assert "kept as it was, your edits included" in out and "approved app: sha256:" in out
    assert (folder / "node_key").read_bytes() != key and not (folder / "hospital.yaml.previous").exists()
    h = load_hospital_config(folder / "hospital.yaml")
    assert h.approved_apps == ["sha256:" + "e" * 64, installed_app_digest()] and h.max_eval_records == 7


def test_force_refuses_a_command_line_the_kept_settings_contradict(world: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "st-g"
    edited, key = _hand_edited(world, folder)
    capsys.readouterr()

    code = main(["hospital", "init", str(folder), "--coordinator", "other.example:9092", "--ca", str(world["ca"]),
                 "--data", str(world["data"]), "--force"])

    assert code == 1
    err = capsys.readouterr().err
    assert "coordinator is '127.0.0.1:9092' there, 'other.example:9092' on the command line" in err
    assert "--new-settings" in err
    assert (folder / "hospital.yaml").read_bytes() == edited and (folder / "node_key").read_bytes() == key


def test_new_settings_writes_a_fresh_file_and_keeps_the_old_one_and_the_key(world: dict[str, Path], tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "st-h"
    edited, key = _hand_edited(world, folder)
    capsys.readouterr()

    assert _init(world, folder, "--new-settings") == 0

    out = capsys.readouterr().out
    assert (folder / "hospital.yaml.previous").read_bytes() == edited
    assert f"the replaced settings are in {folder / 'hospital.yaml.previous'}" in out
    h = load_hospital_config(folder / "hospital.yaml")
    assert h.approved_apps == [installed_app_digest()] and h.max_eval_records == 0
    assert (folder / "node_key").read_bytes() == key  # no --force: the admitted key stays


def test_init_refuses_bad_data_and_writes_nothing(world: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "data" / "derm" / "set"
    bad.mkdir(parents=True)
    (bad / "annotation_train.jsonl").write_text("{not json\n", encoding="utf-8")
    code = main(["hospital", "init", str(tmp_path / "h"), "--coordinator", "127.0.0.1:9092", "--ca",
                 str(world["ca"]), "--data", str(tmp_path / "data")])
    assert code == 1
    err = capsys.readouterr().err
    assert "invalid record" in err and "fedclimb data validate" in err
    assert not (tmp_path / "h").exists()


def test_init_needs_a_ca_unless_insecure(world: dict[str, Path], tmp_path: Path) -> None:
    args = ["hospital", "init", str(tmp_path / "h"), "--coordinator", "127.0.0.1:9092", "--data", str(world["data"])]
    assert main(args) == 2
    assert main([*args, "--insecure"]) == 0
    h = load_hospital_config(tmp_path / "h" / "hospital.yaml")
    assert h.insecure and not h.node_key and not (tmp_path / "h" / "node_key").exists()


# ------------------------------------------------------------------ start refuses before starting anything


@pytest.fixture
def no_processes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    started: list[Any] = []
    monkeypatch.setattr(hospital_start, "Child", lambda *a, **k: started.append(a) or pytest.fail("started"))
    return started


def _copy(initialised: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "h"
    folder.mkdir()
    for name in ("hospital.yaml", "node_key", "ca.crt"):
        (folder / name).write_bytes((initialised / name).read_bytes())
    os.chmod(folder / "node_key", 0o600)
    text = (folder / "hospital.yaml").read_text()
    (folder / "hospital.yaml").write_text(text.replace('state_dir: "state"', f'state_dir: "{tmp_path / "state"}"'))
    return folder


def _refusal(folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["hospital", "start", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedclimb hospital: refusing to start: ")
    return err


def test_start_refuses_a_lost_ledger_beside_privacy_state(initialised: Path, tmp_path: Path, no_processes: list[Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy(initialised, tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "released_domain_counts.json").write_text("{}")
    err = _refusal(folder, capsys)
    assert "has no privacy_ledger.json but holds privacy state" in err and not no_processes


def test_start_refuses_a_corrupt_ledger(initialised: Path, tmp_path: Path, no_processes: list[Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy(initialised, tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "privacy_ledger.json").write_text(json.dumps({"version": 2, "entries": "oops"}))
    assert "privacy_ledger.json is invalid" in _refusal(folder, capsys)


def test_start_refuses_bad_settings_a_readable_key_and_bad_data(initialised: Path, tmp_path: Path,
                                                               no_processes: list[Any],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy(initialised, tmp_path)
    config = folder / "hospital.yaml"
    good = config.read_text()
    config.write_text(good.replace("max_lr: 0.005", "max_lr: -1.0"))
    assert "limits.max_lr" in _refusal(folder, capsys)
    config.write_text(good)
    os.chmod(folder / "node_key", 0o644)
    assert "chmod 600" in _refusal(folder, capsys)
    os.chmod(folder / "node_key", 0o600)
    empty = tmp_path / "empty"
    empty.mkdir()
    config.write_text(good.replace(f'data_root: "{load_hospital_config(initialised / "hospital.yaml").data_root}"',
                                   f'data_root: "{empty}"'))
    assert "no annotation_" in _refusal(folder, capsys)
    assert not no_processes
