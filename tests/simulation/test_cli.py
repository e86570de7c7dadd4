"""Argument handling of `fedclimb data synth`, `data from-dicom` and `privacy report` (exit codes 0 / 1 / 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from opacus.accountants import RDPAccountant
from pydicom.data import get_testdata_file

from common.privacy.ledger import LEDGER_FILENAME, PrivacyLedger
from simulation.cli import main

QUESTION = "Is there an abnormality? Answer with one phrase from the following:"


# ----------------------------------------------------------------------------- data synth


def test_synth_writes_a_federation_and_prints_one_line_per_hospital(tmp_path, capsys):
    out = tmp_path / "fed"
    assert main(["data", "synth", str(out), "--hospitals", "2", "--seed", "1", "--scale", "0.25"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for h, line in enumerate(lines):
        assert line.startswith(f"{out / f'hospital-{h}'}: ")
        assert "train" in line and "valid" in line and "test" in line
    manifest = json.loads((out / "federation.json").read_text(encoding="utf-8"))
    assert manifest["hospitals"] == 2 and manifest["seed"] == 1
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["hospital-0", "hospital-1"]


def test_synth_refuses_a_non_empty_foreign_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("precious", encoding="utf-8")
    assert main(["data", "synth", str(out), "--hospitals", "2", "--scale", "0.25"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["data", "synth", str(out), "--hospitals", "2", "--scale", "0.25", "--overwrite"]) == 2
    assert (out / "thesis.txt").read_text(encoding="utf-8") == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]


def test_synth_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "a"), "--hospitals", "0"]) == 2
    assert "hospitals" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    assert main(["data", "synth", str(blocker), "--hospitals", "1", "--scale", "0.25"]) == 2


# ------------------------------------------------------------------------- privacy report


def test_privacy_report_prints_the_ledger(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    ledger = PrivacyLedger.open(state, delta=1e-5, target_epsilon=8.0, accountant="rdp")
    ledger.record(1, "dpsgd", sample_rate=0.02, noise_multiplier=1.1, steps=20)
    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.02, 20)]
    with np.errstate(divide="ignore", over="ignore"):
        spent = accountant.get_epsilon(delta=1e-5)
    assert main(["privacy", "report", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert "rdp accountant" in out
    row = next(line for line in out.splitlines() if line.startswith("1 "))
    assert row.split()[:5] == ["1", "dpsgd", "0.02", "1.1", "20"]
    assert f"spent eps = {spent:.4f} of target 8 at delta = 1e-05" in out
    assert f"remaining {8.0 - spent:.4f}" in out


def test_privacy_report_missing_directory_exits_2(tmp_path, capsys):
    assert main(["privacy", "report", "--state", str(tmp_path / "absent")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_privacy_report_directory_without_ledger_exits_1(tmp_path, capsys):
    assert main(["privacy", "report", "--state", str(tmp_path)]) == 1
    assert LEDGER_FILENAME in capsys.readouterr().err


def test_privacy_report_corrupt_ledger_exits_1(tmp_path, capsys):
    (tmp_path / LEDGER_FILENAME).write_text("{not json", encoding="utf-8")
    assert main(["privacy", "report", "--state", str(tmp_path)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------- data from-dicom


@pytest.fixture()
def dicom_folder(tmp_path) -> tuple[Path, Path]:
    """Two bundled pydicom files and a labels CSV keyed by SOPInstanceUID (one multi-label row)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    rows = ["SOPInstanceUID,label"]
    for name, label in (("CT_small.dcm", "normal"), ("MR_small.dcm", "mass|edema")):
        shutil.copy(get_testdata_file(name), folder / name)
        rows.append(f"{pydicom.dcmread(folder / name, stop_before_pixels=True).SOPInstanceUID},{label}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder, labels


def from_dicom_args(folder: Path, labels: Path, out: Path, salt: Path, *extra: str) -> list[str]:
    return ["data", "from-dicom", str(folder), str(out), "--labels", str(labels), "--question", QUESTION,
            "--salt-file", str(salt), "--dataset", "scans", *extra]


def test_from_dicom_converts_and_its_output_validates(tmp_path, dicom_folder, capsys):
    folder, labels = dicom_folder
    out, salt = tmp_path / "climb", tmp_path / "secret" / "salt.hex"
    salt.parent.mkdir()
    assert main(from_dicom_args(folder, labels, out, salt, "--splits", "1,0,0")) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"2 records written under {out} from 2 files")
    assert salt.is_file() and not any(p.name == salt.name for p in out.rglob("*"))
    ct = [json.loads(line) for line in (out / "ct" / "scans" / "annotation_train.jsonl").read_text().splitlines()]
    mr = [json.loads(line) for line in (out / "mr" / "scans" / "annotation_train.jsonl").read_text().splitlines()]
    assert [r["conversations"][1]["value"] for r in ct + mr] == ["normal", "mass, edema"]
    # Options default to the sorted labels of the CSV.
    assert ct[0]["conversations"][0]["value"] == f"<image>\n{QUESTION}\nedema\nmass\nnormal"

    assert main(["data", "validate", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] == 2 and data["invalid"] == []
    assert data["counts"] == {"train": {"scans": 2}}


@pytest.mark.parametrize("splits", ["a,b,c", "0.5,0.5", "0.5,0.6,0.1", "0.8,0.1,0.1,0"])
def test_from_dicom_bad_splits_exit_2(tmp_path, dicom_folder, capsys, splits):
    folder, labels = dicom_folder
    out = tmp_path / "climb"
    assert main(from_dicom_args(folder, labels, out, tmp_path / "salt.hex", f"--splits={splits}")) == 2
    assert "split" in capsys.readouterr().err
    assert not out.exists()


def test_from_dicom_salt_file_inside_out_exits_2(tmp_path, dicom_folder, capsys):
    folder, labels = dicom_folder
    out = tmp_path / "climb"
    assert main(from_dicom_args(folder, labels, out, out / "salt.hex")) == 2
    assert "outside" in capsys.readouterr().err


def test_from_dicom_missing_inputs_exit_2(tmp_path, dicom_folder, capsys):
    folder, labels = dicom_folder
    salt = tmp_path / "salt.hex"
    assert main(from_dicom_args(tmp_path / "absent", labels, tmp_path / "o1", salt)) == 2
    assert "DICOM_DIR" in capsys.readouterr().err
    assert main(from_dicom_args(folder, tmp_path / "absent.csv", tmp_path / "o2", salt)) == 2
    assert "--labels" in capsys.readouterr().err
    # A salt file whose folder does not exist is an argument problem, not a crash.
    assert main(from_dicom_args(folder, labels, tmp_path / "o3", tmp_path / "no" / "such" / "salt.hex")) == 2
    assert "salt.hex" in capsys.readouterr().err


def test_simulate_refuses_bad_settings_before_doing_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Usage errors exit 2 with one line naming the key; nothing is written."""
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), "data.max_records=50"]) == 2
    assert "data.max_records" in capsys.readouterr().err
    assert main(["simulate", "--out", str(out), "federation.no_such_key=1"]) == 2
    assert "federation.no_such_key" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("words", "key"),
    [
        (["privacy.target_epsilon=inf"], "privacy.target_epsilon"),
        (["train.lr=inf"], "train.lr"),
        (["rollout.temperature=.inf"], "rollout.temperature"),
        (["train.lr=nan"], "train.lr"),
        (["federation.round_timeout_s=-5"], "federation.round_timeout_s"),
        (["federation.connect_timeout_s=-1"], "federation.connect_timeout_s"),
        (["federation.round_timeout_s=inf"], "federation.round_timeout_s"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["--hospitals", "2", "federation.min_replies=3"], "federation.min_replies"),
        (["federation.min_replies=4"], "federation.min_replies"),  # 3 hospitals by default
        (["federation.fraction_train=0.5", "federation.min_replies=3"], "federation.min_replies"),
        (["--hospitals", "2", "federation.min_hospitals=3"], "federation.min_hospitals"),
    ],
)
def test_simulate_refuses_unusable_numbers_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     words: list[str], key: str) -> None:
    """Values no run could use exit 2 with one line naming the key, before anything is written."""
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedclimb: error: ") and f"{key}:" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_simulate_accepts_as_many_required_replies_as_hospitals_asked(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """The boundary of the check: min_replies = ceil(fraction_train x hospitals) is allowed."""
    from simulation import simulate

    seen = []

    def accepted(cfg: object, out: Path, **_: object) -> None:
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(simulate, "run_simulation", accepted)
    with pytest.raises(_Stop):
        main(["simulate", "--out", str(tmp_path / "run"), "--hospitals", "4", "federation.fraction_train=0.5",
              "federation.min_replies=2", "federation.min_hospitals=4"])
    assert seen and seen[0].federation.min_replies == 2


class _Stop(Exception):
    """Raised by a stand-in for run_simulation once the configuration was accepted."""
