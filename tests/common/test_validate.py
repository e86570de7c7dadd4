"""Tests of common.climb.validate and `fedclimb data validate`: every bad line is reported, none stops the scan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless

from conftest import png_header
from common.climb.validate import ValidationReport, validate_root
from simulation.cli import main
from simulation.synth import generate_federation

JPEG_LS_DECODABLE = get_decoder(JPEGLSLossless).is_available
needs_no_jpeg_ls = pytest.mark.skipif(JPEG_LS_DECODABLE, reason="a JPEG-LS decoder is installed here")

CXR = "xray/chest/annotation_train.jsonl"
CT = "ct/abd/annotation_test.jsonl"
ECG_TRAIN = "ecg/ptb/annotation_train.jsonl"
ECG_VALID = "ecg/ptb/annotation_valid.jsonl"
OPTIONS = "Finding? Answer with one phrase from the following:\nnormal\nabnormal"
IMG_PROMPT = "<image>\n" + OPTIONS
# CT_small.dcm is 128 x 128 pixels; the PNG written below is 48 wide and 32 high.
PNG_W, PNG_H = 48, 32


def llava(prompt: str, answer: str, **extra) -> str:
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return json.dumps({"conversations": turns, **extra})


def ecg(answer: str) -> str:
    return json.dumps({"problem": "Rhythm? Options:\nsinus\nafib", "answer": answer, "time-series": ["ecg/ptb/e.npy"]})


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_valid_root(root: Path) -> None:
    """Valid records only: a PNG (two datasets, one named by the record), a DICOM, two ECG splits."""
    cxr, ct, sig = root / "xray" / "chest", root / "ct" / "abd", root / "ecg" / "ptb"
    for folder in (cxr, ct, sig):
        folder.mkdir(parents=True)
    Image.fromarray(np.full((PNG_H, PNG_W, 3), 80, np.uint8)).save(cxr / "a.png")
    shutil.copy(get_testdata_file("CT_small.dcm"), ct / "s.dcm")
    np.save(sig / "e.npy", np.random.default_rng(0).normal(0, 0.1, (12, 5000)).astype(np.float32))
    write_lines(root / CXR, [
        llava(IMG_PROMPT, "normal", images=["xray/chest/a.png"], bbox=[0, 0, PNG_W, PNG_H]),
        llava(IMG_PROMPT, "abnormal", images=["xray/chest/a.png"], dataset="chexpert"),
    ])
    write_lines(root / CT, [llava(IMG_PROMPT, "abnormal", images=["ct/abd/s.dcm"], bbox=[10, 10, 100, 120])])
    write_lines(root / ECG_TRAIN, [ecg("sinus")])
    write_lines(root / ECG_VALID, [ecg("afib")])


# (file, line, words the reason must contain) for every invalid line added below.
EXPECTED_INVALID = [
    (CXR, 3, ["not valid JSON"]),
    (CXR, 4, ["not found", "xray/chest/missing.png"]),
    (CXR, 5, ["garbage.png", "could not be decoded"]),
    (CXR, 6, ["bbox", "outside", f"{PNG_W}x{PNG_H}"]),
    (CXR, 7, ["'images'", "list of paths"]),
    (CT, 2, ["'maybe'", "not among the options"]),
    (CT, 3, ["2 <image> token(s)", "1 image path(s)"]),
    (ECG_TRAIN, 2, ["empty answer"]),
]


def build_mixed_root(root: Path) -> None:
    """The valid root plus one invalid line of each kind (appended, so valid lines keep their numbers)."""
    build_valid_root(root)
    (root / "xray" / "chest" / "garbage.png").write_bytes(b"this is not a PNG file at all")
    with (root / CXR).open("a", encoding="utf-8") as f:
        f.write("{\"conversations\": [\n")                                                      # 3
        f.write(llava(IMG_PROMPT, "normal", images=["xray/chest/missing.png"]) + "\n")          # 4
        f.write(llava(IMG_PROMPT, "normal", images=["xray/chest/garbage.png"]) + "\n")          # 5
        f.write(llava(IMG_PROMPT, "normal", images=["xray/chest/a.png"], bbox=[0, 0, PNG_W + 1, 10]) + "\n")  # 6
        f.write(llava(IMG_PROMPT, "normal", images=5) + "\n")                                   # 7
    with (root / CT).open("a", encoding="utf-8") as f:
        f.write(llava(IMG_PROMPT, "maybe", images=["ct/abd/s.dcm"]) + "\n")                     # 2
        f.write(llava("<image>\n<image>\n" + OPTIONS, "normal", images=["ct/abd/s.dcm"]) + "\n")  # 3
    with (root / ECG_TRAIN).open("a", encoding="utf-8") as f:
        f.write(ecg("") + "\n")                                                                 # 2


VALID_COUNTS = {"train": {"chest": 1, "chexpert": 1, "ptb": 1}, "test": {"abd": 1}, "valid": {"ptb": 1}}


def problems_by_place(report: ValidationReport) -> dict[tuple[str, int], str]:
    return {(p.file, p.line): p.reason for p in report.invalid}


# ------------------------------------------------------------------------- validate_root


def test_valid_root_has_no_problems(tmp_path):
    build_valid_root(tmp_path)
    report = validate_root(tmp_path)
    assert report.invalid == []
    assert report.ok
    assert report.valid == 5
    assert report.counts == VALID_COUNTS
    assert report.modalities == {"train": {"xray": 2, "ecg": 1}, "test": {"ct": 1}, "valid": {"ecg": 1}}


def test_every_invalid_line_is_reported_with_file_line_and_reason(tmp_path):
    build_mixed_root(tmp_path)
    report = validate_root(tmp_path)
    assert not report.ok
    assert report.valid == 5
    assert report.counts == VALID_COUNTS
    found = problems_by_place(report)
    assert set(found) == {(file, line) for file, line, _ in EXPECTED_INVALID}
    for file, line, words in EXPECTED_INVALID:
        reason = found[(file, line)]
        assert "\n" not in reason
        for word in words:
            assert word in reason, (file, line, reason)


@needs_no_jpeg_ls
def test_unsupported_codec_names_the_transfer_syntax(tmp_path):
    build_valid_root(tmp_path)
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "ct" / "abd" / "ls.dcm")
    with (tmp_path / CT).open("a", encoding="utf-8") as f:
        f.write(llava(IMG_PROMPT, "normal", images=["ct/abd/ls.dcm"]) + "\n")
    report = validate_root(tmp_path)
    assert report.valid == 5
    [problem] = report.invalid
    assert (problem.file, problem.line) == (CT, 2)
    assert "JPEG-LS" in problem.reason
    assert str(JPEGLSLossless) in problem.reason  # 1.2.840.10008.1.2.4.80
    assert "\n" not in problem.reason


def test_structure_only_mode_does_not_open_media(tmp_path):
    build_mixed_root(tmp_path)
    report = validate_root(tmp_path, media=False)
    media_lines = {(CXR, 4), (CXR, 5), (CXR, 6)}
    assert set(problems_by_place(report)) == {(f, n) for f, n, _ in EXPECTED_INVALID} - media_lines
    assert report.valid == 5 + len(media_lines)


def test_domain_key_modality_counts_by_folder(tmp_path):
    build_valid_root(tmp_path)
    report = validate_root(tmp_path, domain_key="modality")
    assert report.counts == {"train": {"xray": 2, "ecg": 1}, "test": {"ct": 1}, "valid": {"ecg": 1}}


def test_a_crashing_decoder_becomes_a_problem_not_an_exception(tmp_path, monkeypatch):
    from common.climb import media

    build_valid_root(tmp_path)

    def explode(path, **kwargs):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(media, "load_image", explode)
    report = validate_root(tmp_path)
    image_lines = {(CXR, 1), (CXR, 2), (CT, 1)}
    assert set(problems_by_place(report)) == image_lines
    assert all("RuntimeError" in p.reason and "decoder bug" in p.reason for p in report.invalid)
    assert report.valid == 2  # the two ECG records


def test_bbox_checked_against_a_segmentation_mask_when_there_is_no_image(tmp_path):
    build_valid_root(tmp_path)
    Image.fromarray(np.zeros((20, 10), np.uint8)).save(tmp_path / "xray" / "chest" / "mask.png")
    with (tmp_path / CXR).open("a", encoding="utf-8") as f:
        f.write(llava(OPTIONS, "normal", segmentation_path="xray/chest/mask.png", bbox=[0, 0, 10, 20]) + "\n")
        f.write(llava(OPTIONS, "normal", segmentation_path="xray/chest/mask.png", bbox=[0, 0, 11, 20]) + "\n")
    report = validate_root(tmp_path)
    assert report.valid == 6
    [problem] = report.invalid
    assert (problem.file, problem.line) == (CXR, 4)
    assert "outside the 10x20 image xray/chest/mask.png" in problem.reason


def test_to_json_shape(tmp_path):
    build_mixed_root(tmp_path)
    data = validate_root(tmp_path).to_json()
    assert set(data) == {"valid", "invalid", "counts"}
    assert data["valid"] == 5
    assert data["counts"] == VALID_COUNTS
    assert all(set(item) == {"file", "line", "reason"} for item in data["invalid"])
    json.dumps(data)  # serialisable


def test_missing_root_validates_to_nothing(tmp_path):
    report = validate_root(tmp_path / "absent")
    assert report.valid == 0 and report.invalid == []


# -------------------------------------------------------------------- fedclimb data validate


def test_cli_exit_0_on_a_valid_root(tmp_path, capsys):
    build_valid_root(tmp_path)
    assert main(["data", "validate", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "5 valid record(s), 0 invalid" in out
    assert "INVALID" not in out


def test_cli_exit_1_and_lists_every_invalid_line(tmp_path, capsys):
    build_mixed_root(tmp_path)
    assert main(["data", "validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"5 valid record(s), {len(EXPECTED_INVALID)} invalid" in out
    for file, line, _ in EXPECTED_INVALID:
        assert f"INVALID {file}:{line}: " in out


def test_cli_json_prints_one_object(tmp_path, capsys):
    build_mixed_root(tmp_path)
    assert main(["data", "validate", str(tmp_path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)  # fails unless stdout is exactly one JSON document
    assert set(data) == {"valid", "invalid", "counts"}
    assert data["valid"] == 5
    assert data["counts"] == VALID_COUNTS
    assert {(i["file"], i["line"]) for i in data["invalid"]} == {(f, n) for f, n, _ in EXPECTED_INVALID}
    assert all(isinstance(i["reason"], str) and i["reason"] for i in data["invalid"])


def test_cli_json_on_a_valid_root_exits_0(tmp_path, capsys):
    build_valid_root(tmp_path)
    assert main(["data", "validate", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {"valid": 5, "invalid": [], "counts": VALID_COUNTS}


def test_cli_exit_2_for_a_missing_path(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "absent")]) == 2
    captured = capsys.readouterr()
    assert "not a directory" in captured.err
    assert captured.out == ""


def test_cli_exit_2_for_a_folder_without_annotation_files(tmp_path, capsys):
    (tmp_path / "xray" / "chest").mkdir(parents=True)
    (tmp_path / "xray" / "chest" / "notes.jsonl").write_text("{}\n", encoding="utf-8")
    assert main(["data", "validate", str(tmp_path), "--json"]) == 2
    assert "no annotation_<split>.jsonl" in capsys.readouterr().err


def test_synthetic_federation_validates(tmp_path, capsys):
    summary = generate_federation(tmp_path / "fed", hospitals=2, seed=0, scale=0.25)
    assert len(summary.hospital_roots) == 2
    for root in summary.hospital_roots:
        assert main(["data", "validate", str(root), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["invalid"] == []
        expected = summary.counts[root.name]
        assert data["valid"] == sum(n for per_split in expected.values() for n in per_split.values())
        assert data["counts"] == {s: dict(c) for s, c in expected.items() if sum(c.values())}


# ------------------------------------------------------------------------- hostile roots


def test_cli_json_is_always_written_for_hostile_lines(tmp_path, capsys):
    """Deep nesting, a 5000-digit integer and invalid UTF-8 each cost their line; stdout stays one JSON report."""
    build_valid_root(tmp_path)
    with (root := tmp_path / CXR).open("ab") as f:
        f.write(b"[" * 200_000 + b"]" * 200_000 + b"\n")                                       # 3
        f.write(b'{"problem": "x", "answer": "y", "age": ' + b"9" * 5000 + b"}\n")            # 4
        f.write(llava(IMG_PROMPT, "normal", images=["xray/chest/a.png"]).encode()[:-2] + b"\xff}\n")  # 5
    assert main(["data", "validate", str(tmp_path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    reasons = {(i["file"], i["line"]): i["reason"] for i in data["invalid"]}
    assert set(reasons) == {(CXR, 3), (CXR, 4), (CXR, 5)}, reasons
    assert "nested too deeply" in reasons[(CXR, 3)] and "not usable JSON" in reasons[(CXR, 4)]
    assert "not UTF-8" in reasons[(CXR, 5)]
    assert data["valid"] == 5 and root.is_file()


def _escape_root(root: Path, outside: Path, target_exists: bool) -> list[str]:
    """One record per way out of the root; returns the relative paths in line order."""
    build_valid_root(root)
    outside.mkdir()
    if target_exists:
        Image.new("L", (4, 4)).save(outside / "x.png")
        np.save(outside / "e.npy", np.zeros((12, 100), np.float32))
        (outside / "dir").mkdir()
        Image.new("L", (4, 4)).save(outside / "dir" / "x.png")
    (root / "xray" / "chest" / "file-link.png").symlink_to(outside / "x.png")
    (root / "xray" / "chest" / "dir-link").symlink_to(outside / "dir")
    rels = ["../outside/x.png", "xray/../../outside/x.png", str(outside / "x.png"), "xray/chest/file-link.png",
            "xray/chest/dir-link/x.png"]
    lines = [llava(IMG_PROMPT, "normal", images=[rel]) for rel in rels]
    lines.append(llava(OPTIONS, "normal", segmentation_path="xray/chest/../../../outside/x.png", bbox=[0, 0, 1, 1]))
    lines.append(json.dumps({"problem": "Rhythm? Options:\nsinus\nafib", "answer": "sinus",
                             "time-series": [str(outside / "e.npy")]}))
    write_lines(root / "xray" / "esc" / "annotation_train.jsonl", lines)
    return [*rels, "xray/chest/../../../outside/x.png", str(outside / "e.npy")]


def test_every_way_out_of_the_root_is_refused_with_one_message_whether_or_not_the_target_exists(tmp_path):
    from common.climb.limits import outside_root_message

    reports = {}
    for exists in (True, False):
        base = tmp_path / str(exists)
        rels = _escape_root(base / "root", base / "outside", exists)
        report = validate_root(base / "root")
        reports[exists] = {p.line: p.reason.replace(str(base), "BASE") for p in report.invalid
                           if p.file == "xray/esc/annotation_train.jsonl"}
        assert report.valid == 5  # the valid root's records only
        for line, rel in enumerate(rels, start=1):
            assert reports[exists][line] == outside_root_message(rel).replace(str(base), "BASE"), line
    assert reports[True] == reports[False]  # no existence oracle


def test_linked_roots_txt_lets_a_root_use_media_of_a_named_folder(tmp_path):
    from common.climb.records import LINKED_ROOTS_FILE

    root, shared = tmp_path / "root", tmp_path / "shared"
    build_valid_root(root)
    shared.mkdir()
    Image.new("L", (PNG_W, PNG_H)).save(shared / "x.png")
    (root / "xray" / "chest" / "shared").symlink_to(shared)
    with (root / CXR).open("a", encoding="utf-8") as f:
        f.write(llava(IMG_PROMPT, "normal", images=["xray/chest/shared/x.png"]) + "\n")
    assert [p.line for p in validate_root(root).invalid] == [3]
    (root / LINKED_ROOTS_FILE).write_text(f"{shared}\n", encoding="utf-8")
    report = validate_root(root)
    assert report.ok and report.valid == 6


def test_a_decompression_bomb_mask_and_a_too_big_image_are_per_record_reasons(tmp_path):
    build_valid_root(tmp_path)
    png_header(tmp_path / "xray" / "chest" / "bomb.png", 30000, 30000)
    png_header(tmp_path / "xray" / "chest" / "big.png", 12000, 12000)
    with (tmp_path / CXR).open("a", encoding="utf-8") as f:
        f.write(llava(OPTIONS, "normal", segmentation_path="xray/chest/bomb.png") + "\n")          # 3
        f.write(llava(IMG_PROMPT, "normal", images=["xray/chest/big.png"]) + "\n")                # 4
        f.write(llava("<image>\n" * 5 + OPTIONS, "normal", images=["xray/chest/a.png"] * 5) + "\n")  # 5
    reasons = problems_by_place(validate_root(tmp_path, max_images=4))
    assert set(reasons) == {(CXR, 3), (CXR, 4), (CXR, 5)}
    assert "data.max_pixels" in reasons[(CXR, 3)] and "data.max_pixels" in reasons[(CXR, 4)]
    assert "5 media files, more than data.max_images=4" in reasons[(CXR, 5)]


def test_the_cli_enforces_the_default_max_images(tmp_path, capsys):
    build_valid_root(tmp_path)
    with (tmp_path / CXR).open("a", encoding="utf-8") as f:
        f.write(llava("<image>\n" * 5 + OPTIONS, "normal", images=["xray/chest/a.png"] * 5) + "\n")
    assert main(["data", "validate", str(tmp_path)]) == 1
    assert "data.max_images=4" in capsys.readouterr().out
