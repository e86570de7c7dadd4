"""`fedclimb data from-table`: tabular rows to CLIMB text records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.table_import import BANDS, band, convert_table, describe_row, read_csv_table
from common.climb.records import load_records
from simulation.cli import main

SALT = b"hospital-secret"


def test_band_edges_by_hand():
    cut = [1.0, 3.0, 7.0, 9.0]  # 10th, 30th, 70th, 90th percentiles
    assert band(0.5, cut) == BANDS[0][1]
    assert band(1.0, cut) == BANDS[0][1]  # at the edge: the lower band
    assert band(2.0, cut) == BANDS[1][1]
    assert band(5.0, cut) == BANDS[2][1]
    assert band(8.0, cut) == BANDS[3][1]
    assert band(9.5, cut) == BANDS[4][1]
    assert describe_row(["a"], [2.0], {"a": cut}) == "- a: 2, low (10th-30th percentile)"


def _csv(path: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(0)
    lines = ["mrn,size,density,diagnosis"]
    for i in range(n):
        y = i % 3 == 0
        lines.append(f"MRN{1000 + i},{rng.normal(5 if y else 2):.3f},{rng.normal():.3f},{'malignant' if y else 'benign'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_rows_become_valid_records_with_pseudonymous_patients(tmp_path):
    table = read_csv_table(_csv(tmp_path / "t.csv"), label_column="diagnosis", id_column="mrn")
    assert table.columns == ["size", "density"]
    summary = convert_table(table, tmp_path / "out", question="Is the lesion malignant?", salt=SALT, dataset="lesions")
    assert sum(summary.written.values()) == 60
    text = "".join(p.read_text() for p in (tmp_path / "out").rglob("*.jsonl"))
    assert "MRN10" not in text  # raw ids never written
    records = [r for s in ("train", "valid", "test") for r in load_records(tmp_path / "out", s)]
    assert len(records) == 60
    by_patient: dict[str, set[str]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert len(by_patient) == 60 and all(len(v) == 1 for v in by_patient.values())
    r = records[0]
    assert r.options == ("benign", "malignant") and r.answers[0] in r.options
    assert "- size: " in r.prompt and "percentile" in r.prompt


def test_bands_come_from_training_rows_only(tmp_path):
    table = read_csv_table(_csv(tmp_path / "t.csv"), label_column="diagnosis", id_column="mrn")
    convert_table(table, tmp_path / "a", question="Q?", salt=SALT)
    test_rows = [i for i, rec in enumerate(table.patient_ids)]
    # Change a held-out row's value wildly: no training record's text changes.
    from client.dicom_import import assign_split, pseudonym

    held = next(i for i in test_rows if assign_split(pseudonym(SALT, table.patient_ids[i]), (0.7, 0.1, 0.2)) == "test")
    table.values[held, 0] = 1e6
    convert_table(table, tmp_path / "b", question="Q?", salt=SALT)
    a = (tmp_path / "a" / "tabular" / "table" / "annotation_train.jsonl").read_text()
    b = (tmp_path / "b" / "tabular" / "table" / "annotation_train.jsonl").read_text()
    assert a == b


@pytest.mark.parametrize("bad, message", [
    ("mrn,size,diagnosis\nA,1.0,\n", "empty label"),
    ("mrn,size,diagnosis\nA,x,benign\n", "not a number"),
    ("mrn,size\nA,1.0\n", "--label-column"),
])
def test_bad_tables_are_refused_with_the_line(tmp_path, bad, message):
    path = tmp_path / "bad.csv"
    path.write_text(bad)
    with pytest.raises(ValueError, match=message):
        read_csv_table(path, label_column="diagnosis", id_column="mrn")


def test_builtin_breast_cancer_by_command(tmp_path, capsys):
    out = tmp_path / "bc"
    assert main(["data", "from-table", str(out), "--builtin", "breast-cancer", "--salt-file", str(tmp_path / "salt")]) == 0
    records = [r for s in ("train", "valid", "test") for r in load_records(out, s)]
    assert len(records) == 569
    labels = [r.answers[0] for r in records]
    assert labels.count("Benign") == 357 and labels.count("Malignant") == 212
    assert "worst concave points" in records[0].prompt
    # The salt must stay outside the data it protects.
    assert main(["data", "from-table", str(out), "--builtin", "breast-cancer", "--salt-file", str(out / "salt")]) == 2
    assert main(["data", "from-table", str(out), "--csv", "x.csv", "--salt-file", str(tmp_path / "salt")]) == 2
    assert "needs --label-column" in capsys.readouterr().err


def test_bands_only_drops_the_values(tmp_path):
    out = tmp_path / "bc"
    features = "worst concave points,worst texture"
    assert main(["data", "from-table", str(out), "--builtin", "breast-cancer", "--salt-file", str(tmp_path / "salt"),
                 "--features", features, "--bands-only"]) == 0
    record = load_records(out, "train")[0]
    lines = [ln for ln in record.prompt.splitlines() if ln.startswith("- ")]
    assert [ln.split(":")[0] for ln in lines] == ["- worst concave points", "- worst texture"]
    words = [w for _, w in BANDS]
    for ln in lines:
        assert ln.split(": ", 1)[1] in words  # the band only: no number before it
    assert "band among" in record.prompt and "value" not in record.prompt.split("\n")[0]


def test_balance_train_evens_the_training_labels_and_keeps_the_test_mix(tmp_path, capsys):
    plain, balanced = tmp_path / "plain", tmp_path / "balanced"
    salt = str(tmp_path / "salt")
    assert main(["data", "from-table", str(plain), "--builtin", "breast-cancer", "--salt-file", salt]) == 0
    capsys.readouterr()
    assert main(["data", "from-table", str(balanced), "--builtin", "breast-cancer", "--salt-file", salt,
                 "--balance-train"]) == 0
    printed = capsys.readouterr().out

    def labels(root, split):
        answers = [r.answers[0] for r in load_records(root, split)]
        return answers.count("Benign"), answers.count("Malignant")

    benign, malignant = labels(plain, "train")
    assert benign > malignant  # 357 : 212 overall
    assert labels(balanced, "train") == (malignant, malignant)  # the benign surplus left out, every malignant kept
    for split in ("valid", "test"):
        assert labels(balanced, split) == labels(plain, split)
    assert f"left out: {benign - malignant} training rows" in printed
    kept = {r.patient_id for r in load_records(balanced, "train")}
    assert kept <= {r.patient_id for r in load_records(plain, "train")}
    # Reproducible: the same salt keeps the same rows.
    again = tmp_path / "again"
    assert main(["data", "from-table", str(again), "--builtin", "breast-cancer", "--salt-file", salt,
                 "--balance-train"]) == 0
    assert {r.patient_id for r in load_records(again, "train")} == kept
