"""Tests of common.climb.records: parsing CLIMB JSONL lines into typed records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from common.climb.errors import RecordError
from common.climb.records import (
    Problem,
    Record,
    annotation_files,
    iter_records,
    load_records,
    parse_record,
    split_answer,
    split_options,
)

FILE = "chest_xray/mimic/annotation_train.jsonl"
QUESTION = "Which finding is shown? Answer with one phrase from the following:"
OPTIONS = ("normal", "pneumonia", "pleural effusion")
PROMPT = "<image>\n" + QUESTION + "\n" + "\n".join(OPTIONS)


def llava(prompt: str, answer: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}], **extra}


def parse(obj, *, file: str = FILE, domain_key: str = "dataset") -> Record:
    return parse_record(obj, root="/data/climb", file=file, line=7, split="train", domain_key=domain_key)


# ------------------------------------------------------------------------------- parsing


def test_llava_style_record():
    r = parse(llava(PROMPT, "pneumonia", images=["chest_xray/mimic/a.png"], patient_id=123, age=61, sex="F"))
    assert r.id == f"{FILE}:7"
    assert (r.file, r.line, r.split) == (FILE, 7, "train")
    assert r.modality == "chest_xray" and r.dataset == "mimic" and r.domain == "mimic"
    assert r.question == QUESTION
    assert r.options == OPTIONS
    assert r.answers == ("pneumonia",)
    assert r.answer_text == "pneumonia"
    assert r.images == ("chest_xray/mimic/a.png",)
    assert r.media_path(r.images[0]) == Path("/data/climb/chest_xray/mimic/a.png")
    assert r.patient_id == "123"
    assert dict(r.demographics) == {"age": 61, "sex": "F"}
    assert r.prompt == PROMPT
    assert not r.has_localisation


def test_flat_problem_answer_record():
    obj = {"problem": "<image>\nIs it malignant? Options:\nyes\nno", "answer": "no", "images": "derm/isic/x.jpg",
           "time-series": ["ecg/ptb/r1.npy"]}
    r = parse(obj, file="derm/isic/annotation_valid.jsonl")
    assert r.question == "Is it malignant? Options:"
    assert r.options == ("yes", "no")
    assert r.answers == ("no",)
    assert r.images == ("derm/isic/x.jpg",)  # one path given as a string
    assert r.time_series == ("ecg/ptb/r1.npy",)
    assert (r.modality, r.dataset) == ("derm", "isic")


def test_split_options_separates_question_and_options_and_drops_placeholders():
    prompt = "<image>\n<video>\nFirst line of context.\nPick one of the following:\n\nA\n  B  \n\nC\n"
    question, options = split_options(prompt)
    assert question == "First line of context.\nPick one of the following:"
    assert options == ("A", "B", "C")
    assert "<image>" not in question and "<video>" not in question


def test_split_options_uses_the_last_line_ending_with_a_colon():
    question, options = split_options("Context: a man, 60.\nNote:\nChoose from:\nx\ny")
    assert question == "Context: a man, 60.\nNote:\nChoose from:"
    assert options == ("x", "y")


def test_free_form_question_has_no_options():
    assert split_options("<image>\nDescribe the finding.") == ("Describe the finding.", ())
    r = parse(llava("<image>\nDescribe the finding.", "a small nodule, left apex", images=["a.png"]))
    assert r.options == ()
    # Without options the answer is never split on ", ".
    assert r.answers == ("a small nodule, left apex",)


def test_multi_label_answer_is_split_and_each_label_checked():
    prompt = "Which apply? Answer with one or more phrases from the following:\nedema\nmass\nfracture"
    r = parse(llava(prompt, "edema, fracture"))
    assert r.answers == ("edema", "fracture")
    assert r.answer_text == "edema, fracture"
    with pytest.raises(RecordError, match="'tumour'"):
        parse(llava(prompt, "edema, tumour"))


def test_answer_that_is_an_option_containing_a_comma_stays_one_label():
    prompt = "Which? Options:\nnormal\nmass, left lobe\nmass, right lobe"
    r = parse(llava(prompt, "mass, left lobe"))
    assert r.answers == ("mass, left lobe",)
    assert split_answer("mass, right lobe", ("normal", "mass, right lobe")) == ("mass, right lobe",)
    assert split_answer("a, b", ("a", "b")) == ("a", "b")


def test_domain_key_dataset_or_modality():
    obj = llava(PROMPT, "normal", images=["x.png"])
    assert parse(obj, domain_key="dataset").domain == "mimic"
    assert parse(obj, domain_key="modality").domain == "chest_xray"


def test_dataset_field_overrides_the_folder_name():
    r = parse(llava(PROMPT, "normal", images=["x.png"], dataset="CheXpert"))
    assert r.dataset == "CheXpert" and r.domain == "CheXpert"
    assert r.modality == "chest_xray"
    # An empty "dataset" value falls back to the folder.
    assert parse(llava(PROMPT, "normal", images=["x.png"], dataset="")).dataset == "mimic"


def test_one_bbox_or_a_list_of_boxes():
    one = parse(llava(PROMPT, "normal", images=["x.png"], bbox=[1, 2, 30.5, 40]))
    assert one.bboxes == ((1.0, 2.0, 30.5, 40.0),)
    assert one.has_localisation
    two = parse(llava(PROMPT, "normal", images=["x.png"], bbox=[[0, 0, 5, 5], [10, 10, 20, 30]]))
    assert two.bboxes == ((0.0, 0.0, 5.0, 5.0), (10.0, 10.0, 20.0, 30.0))
    assert parse(llava(PROMPT, "normal", images=["x.png"], bbox=[])).bboxes == ()


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        (llava(PROMPT, "normal"), r"1 <image> token\(s\) in the question but 0 image path\(s\)"),
        (llava(PROMPT, "normal", images=["a.png", "b.png"]), r"1 <image> token\(s\) .* 2 image path"),
        (llava("<video>\n" + QUESTION + "\nnormal", "normal"), r"1 <video> token\(s\) .* 0 video path"),
        (llava("<image>\nQ?", "yes", images=["a.png"], videos=["v.mp4"]), r"0 <video> token\(s\) .* 1 video path"),
        (llava(PROMPT, "   ", images=["a.png"]), "empty answer"),
        (llava(PROMPT, "", images=["a.png"]), "empty answer"),
        (llava(PROMPT, "cardiomegaly", images=["a.png"]), r"answer 'cardiomegaly' is not among the options"),
        (llava(PROMPT, "normal", images=["a.png"], bbox=[10, 0, 10, 5]), r"x2 <= x1"),
        (llava(PROMPT, "normal", images=["a.png"], bbox=[0, 8, 5, 2]), r"y2 <= y1"),
        (llava(PROMPT, "normal", images=["a.png"], bbox=[1, 2, 3]), r"\[x1, y1, x2, y2\]"),
        (llava(PROMPT, "normal", images=["a.png"], bbox=[0, 0, True, 5]), r"\[x1, y1, x2, y2\]"),
        (llava(PROMPT, "normal", images={"path": "a.png"}), r"'images' must be a list of paths.*dict"),
        (llava(PROMPT, "normal", images=[3]), r"'images' must be a list of paths.*3"),
        (llava(PROMPT, "normal", images=7), r"'images' must be a list of paths.*int"),
        ({"conversations": [{"from": "human", "value": "Q?"}]}, "human and a gpt turn"),
        ({"conversations": "Q?"}, "human and a gpt turn"),
        ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "human", "value": "A"}]}, "'gpt'"),
        ({"question": "Q?", "label": "A"}, "neither 'conversations' nor 'problem'/'answer'"),
        ({"problem": "Q?", "answer": 4}, "must be strings"),
        (llava("Q?", "A", segmentation_path=5), "segmentation_path"),
        (llava("Q?", "A", patient_id=[1]), "patient_id"),
    ],
)
def test_structural_errors_raise_record_error(obj, pattern):
    with pytest.raises(RecordError, match=pattern) as info:
        parse(obj)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("obj", [[1, 2], "text", 3, None])
def test_non_object_json_is_refused(obj):
    with pytest.raises(RecordError, match="must be a JSON object"):
        parse(obj)


def test_folder_fallbacks_for_shallow_files():
    r = parse({"problem": "Q?", "answer": "A"}, file="isic/annotation_test.jsonl")
    assert (r.modality, r.dataset) == ("unknown", "isic")
    r = parse({"problem": "Q?", "answer": "A"}, file="annotation_test.jsonl")
    assert (r.modality, r.dataset) == ("unknown", "unknown")


# ------------------------------------------------------------------------------- reading


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def good(answer: str = "normal") -> str:
    return json.dumps(llava(PROMPT, answer, images=["chest_xray/mimic/a.png"]))


def make_root(root: Path) -> None:
    write_lines(root / "chest_xray" / "mimic" / "annotation_train.jsonl", [
        good(),                     # 1
        "{broken json",             # 2
        "",                         # 3 (blank: skipped, still counted)
        good("pneumonia"),          # 4
        good("not an option"),      # 5
        good("pleural effusion"),   # 6
    ])
    write_lines(root / "chest_xray" / "mimic" / "annotation_test.jsonl", [good()])
    write_lines(root / "derm" / "isic" / "annotation_train.jsonl",
                [json.dumps({"problem": "Q? Options:\nyes\nno", "answer": "yes"})])
    (root / "derm" / "isic" / "notes.jsonl").write_text("ignored\n", encoding="utf-8")


def test_annotation_files_lists_splits_sorted(tmp_path):
    make_root(tmp_path)
    found = [(p.relative_to(tmp_path).as_posix(), s) for p, s in annotation_files(tmp_path)]
    assert found == [
        ("chest_xray/mimic/annotation_test.jsonl", "test"),
        ("chest_xray/mimic/annotation_train.jsonl", "train"),
        ("derm/isic/annotation_train.jsonl", "train"),
    ]


def test_iter_records_yields_problems_with_file_and_line_and_keeps_going(tmp_path):
    make_root(tmp_path)
    items = list(iter_records(tmp_path, splits=("train",)))
    train = "chest_xray/mimic/annotation_train.jsonl"
    problems = [i for i in items if isinstance(i, Problem)]
    records = [i for i in items if isinstance(i, Record)]
    assert [(p.file, p.line) for p in problems] == [(train, 2), (train, 5)]
    assert "not valid JSON" in problems[0].reason
    assert "'not an option'" in problems[1].reason
    assert [r.id for r in records] == [f"{train}:1", f"{train}:4", f"{train}:6", "derm/isic/annotation_train.jsonl:1"]
    assert all(r.root == str(tmp_path) for r in records)


def test_iter_records_reports_a_non_utf8_file(tmp_path):
    path = tmp_path / "ct" / "x" / "annotation_train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfe\x00garbage\n")
    items = list(iter_records(tmp_path))
    assert len(items) == 1 and isinstance(items[0], Problem)
    assert items[0].file == "ct/x/annotation_train.jsonl"
    assert "UTF-8" in items[0].reason


def test_load_records_skips_invalid_lines(tmp_path, caplog):
    make_root(tmp_path)
    with caplog.at_level(logging.WARNING, logger="common.climb.records"):
        records = load_records(tmp_path, "train")
    assert [r.line for r in records] == [1, 4, 6, 1]
    assert [r.answers for r in records] == [("normal",), ("pneumonia",), ("pleural effusion",), ("yes",)]
    assert "2 invalid record(s) skipped" in caplog.text
    assert [r.id for r in load_records(tmp_path, "test")] == ["chest_xray/mimic/annotation_test.jsonl:1"]
    assert load_records(tmp_path, "valid") == []


def test_load_records_honours_max_records(tmp_path):
    make_root(tmp_path)
    # 4 valid training records (mimic:1, 4, 6, isic:1); a cap of 2 keeps every second one.
    records = load_records(tmp_path, "train", max_records=2)
    assert [r.id for r in records] == ["chest_xray/mimic/annotation_train.jsonl:1",
                                       "chest_xray/mimic/annotation_train.jsonl:6"]
    # A cap of 3 steps by 4/3: indices 0, 1 and 2.
    assert [r.line for r in load_records(tmp_path, "train", max_records=3)] == [1, 4, 6]
    assert len(load_records(tmp_path, "train", max_records=9)) == 4


def test_load_records_domain_key_modality(tmp_path):
    make_root(tmp_path)
    domains = [r.domain for r in load_records(tmp_path, "train", domain_key="modality")]
    assert domains == ["chest_xray", "chest_xray", "chest_xray", "derm"]


# --------------------------------------------------------------------------- hostile annotation lines

TEXT_Q = "Q? Options:\nyes\nno"


def flat(answer: str = "yes", **extra) -> str:
    return json.dumps({"problem": TEXT_Q, "answer": answer, **extra})


def annotation(root: Path, lines: list[bytes]) -> Path:
    path = root / "lab" / "labs" / "annotation_train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _problems(items: list) -> dict[int, str]:
    return {i.line: i.reason for i in items if isinstance(i, Problem)}


# (what, the hostile line, the line limit, words of its reason); a 50 MB line is simulated with a lowered limit
HOSTILE_LINES = [
    ("invalid UTF-8 byte", flat("yXs").encode().replace(b"X", b"\xe9"), 1 << 20, "not UTF-8 text (byte 0xe9"),
    ("array nested 200000 deep", b"[" * 200_000 + b"]" * 200_000, 1 << 20, "nested too deeply"),
    ("object nested 200000 deep", b'{"a":' * 200_000 + b"1" + b"}" * 200_000, 2 << 20, "nested too deeply"),
    ("5000-digit integer", b'{"problem": "x", "answer": "y", "age": ' + b"9" * 5000 + b"}", 1 << 20,
     "not usable JSON"),
    ("NaN bbox", flat(bbox=[0, 0, 5, 5]).replace("5]", "NaN]").encode(), 1 << 20, "NaN is not a JSON number"),
    ("Infinity bbox", flat(bbox=[0, 0, 5, 5]).replace("5]", "Infinity]").encode(), 1 << 20,
     "Infinity is not a JSON number"),
    ("1e999 (infinite) bbox", flat(bbox=[0, 0, 5, 5]).replace("5]", "1e999]").encode(), 1 << 20,
     "not a finite number"),
    ("a line over max_line_bytes", flat(note="x" * 600).encode(), 500, "longer than data.max_line_bytes=500"),
]


@pytest.mark.parametrize(("what", "line", "limit", "reason"), HOSTILE_LINES, ids=[h[0] for h in HOSTILE_LINES])
def test_a_hostile_line_costs_that_line_only(tmp_path: Path, what: str, line: bytes, limit: int, reason: str) -> None:
    """The bad line is a Problem with its number; the lines around it are still read."""
    annotation(tmp_path, [flat().encode(), line, flat("no").encode()])
    items = list(iter_records(tmp_path, max_line_bytes=limit))
    assert list(_problems(items)) == [2], items
    assert reason in _problems(items)[2]
    assert [i.line for i in items if isinstance(i, Record)] == [1, 3]


def test_invalid_utf8_on_line_500_of_1000_keeps_the_other_999(tmp_path: Path) -> None:
    lines = [flat("yes" if k % 2 else "no").encode() for k in range(1000)]
    lines[499] = lines[499].replace(b'"answer"', b'"ans\xe9wer"')
    annotation(tmp_path, lines)
    items = list(iter_records(tmp_path))
    assert _problems(items) == {500: f"line is not UTF-8 text (byte 0xe9 at byte {lines[499].index(0xE9) + 1})"}
    assert len([i for i in items if isinstance(i, Record)]) == 999


def test_a_line_exactly_at_the_limit_passes_and_numbering_survives_crlf(tmp_path: Path) -> None:
    line = flat().encode()
    path = annotation(tmp_path, [])
    path.write_bytes(line + b"\r\n" + line + b"x" + b"\r\n" + line + b"\r\n")
    items = list(iter_records(tmp_path, max_line_bytes=len(line)))
    assert [i.line for i in items if isinstance(i, Record)] == [1, 3]
    assert list(_problems(items)) == [2]


def test_a_byte_order_mark_on_the_first_line_is_accepted(tmp_path: Path) -> None:
    annotation(tmp_path, [b"\xef\xbb\xbf" + flat().encode()])
    assert [i.line for i in iter_records(tmp_path) if isinstance(i, Record)] == [1]


@pytest.mark.parametrize("target", ["/dev/zero", "outside", "folder inside"])
def test_an_annotation_file_that_is_not_a_regular_file_inside_the_root_is_refused(tmp_path: Path, target: str) -> None:
    root = tmp_path / "root"
    (root / "lab" / "labs").mkdir(parents=True)
    expected = "annotation file 'lab/labs/annotation_train.jsonl' is outside the data root"
    if target == "outside":
        target = str(annotation(tmp_path / "elsewhere", [flat().encode()]))
    elif target == "folder inside":
        (root / "folder").mkdir()
        target, expected = str(root / "folder"), "not a regular file"
    (root / "lab" / "labs" / "annotation_train.jsonl").symlink_to(target)
    items = list(iter_records(root))
    assert len(items) == 1 and isinstance(items[0], Problem) and items[0].line == 0
    assert expected in items[0].reason


# --------------------------------------------------------------------------- the data root is a boundary

ESCAPES = [
    ("images", "../outside/x.png"),
    ("images", "a/../../outside/x.png"),
    ("images", "/etc/passwd"),
    ("images", "..\\outside\\x.png"),
    ("time-series", "/abs/ecg.npy"),
    ("segmentation_path", "../outside/x.png"),
    ("segmentation_path", "masks/../../outside/x.png"),
]


@pytest.mark.parametrize(("field", "rel"), ESCAPES)
def test_paths_that_leave_the_root_are_refused_when_parsed(field: str, rel: str) -> None:
    from common.climb.limits import outside_root_message

    prompt = ("<image>\n" if field == "images" else "") + TEXT_Q
    obj = {"problem": prompt, "answer": "yes", field: rel if field == "segmentation_path" else [rel]}
    with pytest.raises(RecordError) as caught:
        parse(obj)
    assert str(caught.value) == outside_root_message(rel)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_media_path_refuses_symlinks_out_of_the_root_alike_whether_or_not_the_target_exists(tmp_path: Path,
                                                                                             kind: str) -> None:
    from common.climb.errors import MediaError

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    reasons = []
    for name, exists in (("a", True), ("b", False)):
        target = outside / name
        if exists:
            target.mkdir() if kind == "folder" else target.write_bytes(b"secret")
        (root / "img" / name).symlink_to(target)
        rel = f"img/{name}/x.png" if kind == "folder" else f"img/{name}"
        record = parse_record({"problem": "<image>\n" + TEXT_Q, "answer": "yes", "images": [rel]},
                              root=root, file="lab/labs/annotation_train.jsonl", line=1, split="train")
        with pytest.raises(MediaError) as caught:
            record.media_path(rel)
        reasons.append(str(caught.value).replace(rel, "REL"))
    assert reasons[0] == reasons[1] and "outside the data root" in reasons[0]


def test_linked_roots_file_is_an_explicit_allow_list(tmp_path: Path) -> None:
    from common.climb.records import LINKED_ROOTS_FILE, linked_roots

    root, shared, other = tmp_path / "root", tmp_path / "shared", tmp_path / "other"
    for folder in (root / "img", shared, other):
        folder.mkdir(parents=True)
    (root / "img" / "s").symlink_to(shared)
    (root / "img" / "o").symlink_to(other)
    (root / LINKED_ROOTS_FILE).write_text(f"# media shared with the root we were cut from\n{shared}\nrelative/x\n"
                                          f"{tmp_path / 'missing'}\n", encoding="utf-8")
    assert linked_roots(root) == (str(shared.resolve()),)
    annotation(root, [flat(images=[p]).replace('"problem": "', '"problem": "<image>\\n').encode()
                      for p in ("img/s/x.png", "img/o/x.png")])
    first, second = list(iter_records(root))
    assert first.media_path("img/s/x.png") == root / "img/s/x.png"
    from common.climb.errors import MediaError

    with pytest.raises(MediaError, match="outside the data root"):
        second.media_path("img/o/x.png")


def test_a_symlink_loop_is_a_media_error_not_a_crash(tmp_path: Path) -> None:
    from common.climb.errors import MediaError

    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    record = parse_record({"problem": "<image>\n" + TEXT_Q, "answer": "yes", "images": ["a.png"]},
                          root=tmp_path, file="lab/labs/annotation_train.jsonl", line=1, split="train")
    with pytest.raises(MediaError, match="cannot be resolved"):
        record.media_path("a.png")
