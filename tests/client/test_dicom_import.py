"""Hospital DICOM import: CLIMB structure, no PHI in the output, stable pseudonyms, patient-level splits."""

import json
import re
import shutil
import stat
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from client.dicom_import import (
    ANSWER_SEPARATOR,
    age_from_dates,
    assign_split,
    build_prompt,
    convert_dicom_folder,
    load_or_create_salt,
    parse_patient_age,
    pseudonym,
    read_labels,
    report_age,
)

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
DIRTESTS = TEST_FILES / "dicomdirtests"
BUNDLED = [
    "CT_small.dcm", "MR_small.dcm", "examples_ybr_color.dcm", "waveform_ecg.dcm", "MR_small_jpeg_ls_lossless.dcm",
]
DIRTEST_FILES = [
    "77654033/CR1/6154", "77654033/CR2/6247", "77654033/CT2/17106", "98892001/CT2N/6293",
    "98892001/CT5N/2062", "98892003/MR1/4919", "98892003/MR2/4950", "98892003/MR700/4467",
]
QUESTION = "Above is a scan of a patient. Is there an abnormality? Answer with one or more phrases from the following:"
SALT = b"test-hospital-secret-0123456789"
SPREAD = (0.34, 0.33, 0.33)
# Values this short ("2", "134", "204") occur by chance in hex names; they are checked as whole
# JSON values and path parts instead of substrings.
MIN_SUBSTRING = 4


def build_hospital(root: Path) -> Path:
    """A DICOM tree of real bundled files, a few given realistic PHI, plus a text file."""
    hospital = root / "hospital"
    for rel in DIRTEST_FILES:
        target = hospital / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DIRTESTS / rel, target)
    for name in BUNDLED:
        shutil.copy(get_testdata_file(name), hospital / name)
    ds = pydicom.dcmread(hospital / "MR_small.dcm")
    ds.PatientName = "Smithfield^Alexandra^Maria"
    ds.PatientBirthDate = "19540312"
    ds.AccessionNumber = "ACC20230917X"
    if "PatientAge" in ds:
        del ds.PatientAge
    ds.StudyDate = "20010101"  # 46 years after the birth date
    ds.save_as(hospital / "MR_small.dcm")
    ds = pydicom.dcmread(hospital / "77654033/CT2/17106")
    ds.PatientAge = "093Y"
    ds.save_as(hospital / "77654033/CT2/17106")
    (hospital / "notes.txt").write_text("not DICOM")
    return hospital


def dicom_files(hospital: Path) -> list[Path]:
    return sorted(p for p in hospital.rglob("*") if p.is_file() and p.suffix != ".txt")


def write_labels(hospital: Path, path: Path, key: str) -> Path:
    """Labels for every DICOM except CR2/6247 (left unlabelled), plus one row matching nothing."""
    rows = []
    for index, file in enumerate(dicom_files(hospital)):
        rel = file.relative_to(hospital).as_posix()
        if rel.endswith("CR2/6247"):
            continue
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        value = {"SOPInstanceUID": ds.SOPInstanceUID, "StudyInstanceUID": ds.StudyInstanceUID,
                 "file": rel if index % 2 else Path(rel).name}[key]
        label = ["normal", "fracture|effusion", "effusion"][index % 3]
        rows.append((value, label))
    rows.append(("1.2.3.999" if key != "file" else "nowhere/missing.dcm", "normal"))
    lines = [f"{key},label"] + [f"{value},{label}" for value, label in dict(rows).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def identifiers(hospital: Path) -> set[str]:
    """Every non-empty name component, patient ID, birth date and accession number of the sources."""
    found = set()
    for file in dicom_files(hospital):
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        found.update(re.split(r"[\^=]", str(ds.get("PatientName", ""))))
        found.update(str(ds.get(keyword, "")) for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber"))
    return {value.strip() for value in found if value.strip()}


def read_records(out: Path) -> dict[str, list[dict]]:
    records: dict[str, list[dict]] = {}
    for path in sorted(out.rglob("annotation_*.jsonl")):
        split = path.stem.removeprefix("annotation_")
        records.setdefault(split, []).extend(json.loads(line) for line in path.read_text().splitlines())
    return records


def check_structure(out: Path) -> int:
    """A CLIMB structural check; returns the number of records."""
    count = 0
    for path in sorted(out.rglob("annotation_*.jsonl")):
        modality, dataset = path.parent.relative_to(out).parts
        assert path.stem in ("annotation_train", "annotation_valid", "annotation_test")
        for line in path.read_text().splitlines():
            record = json.loads(line)
            count += 1
            human, gpt = record["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            assert human["value"].count("<image>") == len(record["images"]) >= 1
            assert record["dataset"] == dataset
            assert re.fullmatch(r"[0-9a-f]{16}", record["patient_id"])
            options = human["value"].split(QUESTION + "\n", 1)[1].split("\n")
            assert set(gpt["value"].split(ANSWER_SEPARATOR)) <= set(options)
            for image in record["images"]:
                assert image.startswith(f"{modality}/{dataset}/images/")
                with Image.open(out / image) as opened:
                    opened.verify()
    return count


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("import")
    hospital = build_hospital(root)
    labels = write_labels(hospital, root / "labels_sop.csv", "SOPInstanceUID")
    out = root / "out"
    summary = convert_dicom_folder(hospital, out, labels, QUESTION, salt=SALT, dataset="demo", split_fractions=SPREAD)
    return {"root": root, "hospital": hospital, "out": out, "summary": summary}


def test_structure_and_summary(converted: dict) -> None:
    summary, out = converted["summary"], converted["out"]
    assert check_structure(out) == summary.records_written == 10  # 13 DICOMs - 1 unlabelled - 2 unusable
    assert set(summary.written) == {"cr/demo", "ct/demo", "mr/demo", "us/demo"}
    assert [path for path, _ in summary.skipped_not_dicom] == ["notes.txt"]
    assert summary.skipped_unlabelled == ["77654033/CR2/6247"]
    reasons = dict(summary.skipped_undecodable)
    assert "JPEG-LS" in reasons["MR_small_jpeg_ls_lossless.dcm"]
    assert "no Pixel Data" in reasons["waveform_ecg.dcm"]
    assert summary.unmatched_labels == ["1.2.3.999"]
    assert summary.options == ["effusion", "fracture", "normal"]
    assert "10 records written" in summary.report()


def test_multiframe_gives_four_images_and_demographics(converted: dict) -> None:
    records = [r for split in read_records(converted["out"]).values() for r in split]
    ultrasound = [r for r in records if r["images"][0].startswith("us/")]
    assert len(ultrasound) == 1 and len(ultrasound[0]["images"]) == 4
    ages = sorted(str(r.get("age")) for r in records)
    assert "90+" in ages and "46" in ages  # capped PatientAge, and age from birth and study dates
    assert {r.get("sex") for r in records} <= {"M", "F", "O", None}
    assert any(r["conversations"][1]["value"] == "fracture, effusion" for r in records)


def test_no_phi_anywhere_in_the_output(converted: dict) -> None:
    out, hospital = converted["out"], converted["hospital"]
    values = identifiers(hospital)
    assert {"Smithfield", "Alexandra", "19540312", "ACC20230917X", "77654033", "Archibald", "03028041970546"} <= values
    files = sorted(p for p in out.rglob("*") if p.is_file())
    blobs = {path: path.read_bytes() for path in files}
    paths = [path.relative_to(out).as_posix() for path in out.rglob("*")]
    texts = [blob.decode("latin-1").lower() for blob in blobs.values()] + [p.lower() for p in paths]
    json_values = set()
    for path in files:
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json_values.update(str(v) for v in _leaves(json.loads(line)))
    for value in values:
        if len(value) >= MIN_SUBSTRING:
            assert not any(value.lower() in text for text in texts), value
        else:
            assert value not in json_values, value
            assert not any(value in Path(p).parts or Path(p).stem == value for p in paths), value
    for blob in blobs.values():
        assert SALT not in blob and SALT.hex().encode() not in blob
    for path in files:
        if path.suffix == ".png":
            assert set(_png_chunks(blobs[path])) <= {b"IHDR", b"PLTE", b"IDAT", b"IEND"}


def test_same_salt_same_pseudonyms_other_salt_different(converted: dict, tmp_path: Path) -> None:
    hospital, root = converted["hospital"], converted["root"]
    labels = root / "labels_sop.csv"
    again = convert_dicom_folder(hospital, tmp_path / "again", labels, QUESTION, salt=SALT, dataset="demo",
                                 split_fractions=SPREAD)
    other = convert_dicom_folder(hospital, tmp_path / "other", labels, QUESTION, salt=b"another-secret",
                                 dataset="demo", split_fractions=SPREAD)
    first = read_records(converted["out"])
    assert read_records(tmp_path / "again") == first
    assert again.records_written == other.records_written == 10
    ids = {r["patient_id"] for split in first.values() for r in split}
    other_ids = {r["patient_id"] for split in read_records(tmp_path / "other").values() for r in split}
    assert len(ids) == len(other_ids) == 5 and not ids & other_ids
    names = {p.name for p in (converted["out"]).rglob("*.png")}
    assert names == {p.name for p in (tmp_path / "again").rglob("*.png")}
    assert not names & {p.name for p in (tmp_path / "other").rglob("*.png")}


def test_patient_never_spans_two_splits(converted: dict) -> None:
    records = read_records(converted["out"])
    splits_of: dict[str, set[str]] = {}
    for split, items in records.items():
        for record in items:
            splits_of.setdefault(record["patient_id"], set()).add(split)
    assert all(len(splits) == 1 for splits in splits_of.values())
    assert len({next(iter(s)) for s in splits_of.values()}) >= 2  # the spread really splits


@pytest.mark.parametrize("key", ["StudyInstanceUID", "file"])
def test_other_label_keys(converted: dict, tmp_path: Path, key: str) -> None:
    hospital = converted["hospital"]
    labels = write_labels(hospital, tmp_path / f"labels_{key}.csv", key)
    summary = convert_dicom_folder(hospital, tmp_path / "out", labels, QUESTION, salt=SALT, dataset="demo",
                                   modality="scans")
    assert check_structure(tmp_path / "out") == summary.records_written
    assert set(summary.written) == {"scans/demo"}
    if key == "file":
        assert summary.records_written == 10 and summary.unmatched_labels == ["nowhere/missing.dcm"]
    else:
        # A study label covers the whole study, including the CR2 file left out of the CSV.
        assert summary.records_written == 11 and summary.unmatched_labels == ["1.2.3.999"]


def test_salt_file_created_once_and_kept_outside_output(converted: dict, tmp_path: Path) -> None:
    hospital, labels = converted["hospital"], converted["root"] / "labels_sop.csv"
    salt_file = tmp_path / "secret" / "salt.hex"
    salt_file.parent.mkdir()
    convert_dicom_folder(hospital, tmp_path / "a", labels, QUESTION, salt_file=salt_file, dataset="demo")
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt = load_or_create_salt(salt_file)
    convert_dicom_folder(hospital, tmp_path / "b", labels, QUESTION, salt_file=salt_file, dataset="demo")
    assert read_records(tmp_path / "a") == read_records(tmp_path / "b")
    assert not any(salt.hex().encode() in p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file())
    with pytest.raises(ValueError, match="inside the output folder"):
        convert_dicom_folder(hospital, tmp_path / "c", labels, QUESTION, salt_file=tmp_path / "c" / "salt")
    with pytest.raises(ValueError, match="exactly one"):
        convert_dicom_folder(hospital, tmp_path / "d", labels, QUESTION)


def test_default_dataset_name_and_identifying_folder(converted: dict, tmp_path: Path) -> None:
    source = tmp_path / "Chest Scans 2024"
    shutil.copytree(converted["hospital"] / "98892003", source)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n4919,normal\n4950,effusion\n4467,normal\n")
    summary = convert_dicom_folder(source, tmp_path / "out", labels, QUESTION, salt=SALT)
    assert set(summary.written) == {"mr/chest_scans_2024"}
    leaky = tmp_path / "doe_peter_98890234"
    shutil.copytree(converted["hospital"] / "98892003", leaky)
    with pytest.raises(ValueError, match="patient identifiers"):
        convert_dicom_folder(leaky, tmp_path / "out2", labels, QUESTION, salt=SALT)


def test_bad_arguments(converted: dict, tmp_path: Path) -> None:
    hospital, labels = converted["hospital"], converted["root"] / "labels_sop.csv"
    with pytest.raises(ValueError, match="not among the options"):
        convert_dicom_folder(hospital, tmp_path / "o", labels, QUESTION, salt=SALT, options=["normal"])
    with pytest.raises(ValueError, match="summing to 1"):
        convert_dicom_folder(hospital, tmp_path / "o", labels, QUESTION, salt=SALT, split_fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="lowercase"):
        convert_dicom_folder(hospital, tmp_path / "o", labels, QUESTION, salt=SALT, dataset="Brain CT")
    with pytest.raises(ValueError, match="<image>"):
        convert_dicom_folder(hospital, tmp_path / "o", labels, "<image> what?", salt=SALT)


def test_labels_csv_validation(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("\ufefffile,label\na.dcm,x | y\nb.dcm,z\n")
    table = read_labels(path)
    assert table.key_column == "file" and table.labels == {"a.dcm": ["x", "y"], "b.dcm": ["z"]}
    assert table.all_labels() == ["x", "y", "z"]
    for text, message in [
        ("file,SOPInstanceUID,label\na,b,c\n", "exactly one"),
        ("file,diagnosis\na,b\n", "exactly one"),
        ("file,label\na,\n", "empty"),
        ("file,label\na,x\na,y\n", "already has labels"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_labels(path)


def test_pure_helpers_hand_values() -> None:
    assert [parse_patient_age(v) for v in ("042Y", "006M", "018M", "003W", "010D", "", None, "42")] == [
        42, 0, 1, 0, 0, None, None, None]
    assert age_from_dates("19540312", "20010101") == 46
    assert age_from_dates("19540312", "20010312") == 47
    assert age_from_dates("2001", "20010101") is None and age_from_dates("20020101", "20010101") is None
    assert [report_age(a) for a in (None, 0, 89, 90, 104)] == [None, 0, 89, "90+", "90+"]
    assert build_prompt("Q?", ["a", "b"], 2) == "<image>\n<image>\nQ?\na\nb"
    # HMAC-SHA256(key b"k", message b"123"), first 16 hex digits, computed with the hmac module.
    assert pseudonym(b"k", "123") == "54536c9357ebad32"
    assert pseudonym(b"j", "123") != pseudonym(b"k", "123") != pseudonym(b"k", "124")
    assert assign_split("0" * 16) == "train" and assign_split("f" * 16) == "test"
    assert assign_split("e" + "0" * 15) == "valid"  # 0xe / 0x10 = 0.875 lies in [0.8, 0.9)
    assert assign_split("f" * 16, (1.0, 0.0, 0.0)) == "train"


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _png_chunks(blob: bytes) -> list[bytes]:
    chunks, offset = [], 8
    while offset < len(blob):
        length = int.from_bytes(blob[offset : offset + 4], "big")
        chunks.append(blob[offset + 4 : offset + 8])
        offset += 12 + length
    return chunks
