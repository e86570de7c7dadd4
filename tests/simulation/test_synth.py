"""Tests of the synthetic CLIMB federation (simulation.synth)."""

from __future__ import annotations

import json
import re
import struct
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy.signal import find_peaks

from simulation.synth import (
    GENERATOR_VERSION,
    MANIFEST_NAME,
    FederationSummary,
    generate_federation,
    load_federation,
)
from simulation.synth_ecg import ECG_STYLE
from simulation.synth_labs import GLUCOSE, HBA1C
from simulation.synth_spec import (
    CXR,
    DOMAINS,
    ECG,
    IMAGE_TOKEN,
    LABS,
    OPTIONS_LEAD,
    SPLITS,
    FederationPlan,
    prompt,
    split_labels,
    split_sizes,
)

DOMAIN_BY_KEY = {domain.key: domain for domain in DOMAINS}
BASE_KEYS = {"conversations", "dataset", "patient_id", "age", "sex"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALLOWED_PNG_CHUNKS = {b"IHDR", b"IDAT", b"IEND"}
Rows = list[tuple[int, str, dict[str, Any]]]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _records(
    summary: FederationSummary, *, split: str | None = None
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(hospital index, split, record) for every JSONL line."""
    for h, root in enumerate(summary.hospital_roots):
        for path in sorted(root.rglob("annotation_*.jsonl")):
            this_split = path.stem.removeprefix("annotation_")
            if split not in (None, this_split):
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                yield h, this_split, json.loads(line)


def _options(record: dict[str, Any]) -> list[str]:
    human = record["conversations"][0]["value"]
    _, _, options = human.rpartition(OPTIONS_LEAD + "\n")
    return options.split("\n")


def _answer(record: dict[str, Any]) -> str:
    return str(record["conversations"][1]["value"])


def _label(record: dict[str, Any]) -> int:
    return DOMAIN_BY_KEY[record["dataset"]].options.index(_answer(record))


def _png_chunks(data: bytes) -> list[bytes]:
    chunks, offset = [], len(PNG_SIGNATURE)
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunks.append(data[offset + 4 : offset + 8])
        offset += 12 + length
    return chunks


def _central(image: np.ndarray, *, margin: float) -> np.ndarray:
    side = image.shape[0]
    lo, hi = round(margin * side), round((1.0 - margin) * side)
    return image[lo:hi, lo:hi]


def _cxr_brightness(root: Path, record: dict[str, Any]) -> float:
    image = np.asarray(Image.open(root / record["images"][0]), dtype=np.float64)
    return float(_central(image, margin=0.15).mean())


def _derm_darkness(root: Path, record: dict[str, Any]) -> float:
    image = np.asarray(Image.open(root / record["images"][0]), dtype=np.float64)
    return float(255.0 - _central(image, margin=0.2).mean())


def _fundus_dark_red(root: Path, record: dict[str, Any]) -> float:
    image = np.asarray(Image.open(root / record["images"][0]), dtype=np.int64)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return float(np.count_nonzero((r > 50) & (r < 140) & (g < 40) & (b < 40)))


def _ecg_rr_seconds(root: Path, record: dict[str, Any]) -> float:
    lead_ii = np.load(root / record["time-series"][0])[1].astype(np.float64)
    lead_ii -= np.median(lead_ii)
    fs = ECG_STYLE.fs
    peaks, _ = find_peaks(lead_ii, height=0.5 * lead_ii.max(), distance=int(0.2 * fs))
    return float(np.median(np.diff(peaks)) / fs)


def _lab_high_flags(_: Path, record: dict[str, Any]) -> float:
    return float(record["conversations"][0]["value"].count("(H)"))


FEATURES: dict[str, Callable[[Path, dict[str, Any]], float]] = {
    "synth_cxr": _cxr_brightness,
    "synth_derm": _derm_darkness,
    "synth_ecg": _ecg_rr_seconds,
    "synth_labs": _lab_high_flags,
    "synth_fundus": _fundus_dark_red,
}


def _stump_accuracy(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> float:
    """Test accuracy of the best single-threshold classifier fitted on train."""
    x_train, y_train = train
    best = (-1.0, 0.0, 1.0)
    for threshold in np.unique(x_train):
        for sign in (1.0, -1.0):
            pred = (sign * (x_train - threshold) >= 0).astype(int)
            accuracy = float(np.mean(pred == y_train))
            if accuracy > best[0]:
                best = (accuracy, float(threshold), sign)
    _, threshold, sign = best
    x_test, y_test = test
    return float(np.mean((sign * (x_test - threshold) >= 0).astype(int) == y_test))


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def test_split_sizes_follow_70_10_20_with_even_floors() -> None:
    """valid/test are 1/7 and 2/7 of train rounded up to even, test at least 10."""
    plan = FederationPlan()
    expected = {
        (190, 1.0): {"train": 190, "valid": 28, "test": 56},
        (20, 1.0): {"train": 20, "valid": 4, "test": 10},
        (20, 0.1): {"train": 4, "valid": 2, "test": 10},
    }
    for (base, scale), sizes in expected.items():
        assert split_sizes(base, scale=scale, plan=plan) == sizes


def test_split_labels_balance_valid_and_test() -> None:
    """Valid/test labels are half positive; train follows the prevalence."""
    rng = np.random.default_rng(0)
    assert split_labels(rng, n=10, split="test", prevalence=0.1).sum() == 5
    assert split_labels(rng, n=100, split="train", prevalence=0.3).sum() == 30
    assert split_labels(rng, n=5, split="train", prevalence=0.0).sum() == 1


def test_lab_lines_are_flagged_from_the_printed_value() -> None:
    """A value is flagged only if its printed form leaves the reference range."""
    assert GLUCOSE.line(182.2) == "Fasting glucose: 182 mg/dL (H)"
    assert GLUCOSE.line(99.4) == "Fasting glucose: 99 mg/dL"
    assert HBA1C.line(8.43) == "HbA1c: 8.4 % (H)"
    assert HBA1C.line(3.94) == "HbA1c: 3.9 % (L)"


def test_prompts_use_climb_phrasing() -> None:
    """Media token(s) first, then the question, then one option per line."""
    assert prompt(CXR) == (
        "<image>\nAbove is a chest X-ray image of a patient. What is the diagnosis of "
        "the patient in the X-ray image? Answer with one phrase from the following:\n"
        "Normal\nPneumonia"
    )
    assert prompt(CXR, n_images=2).startswith("<image>\n<image>\nAbove are frontal")
    assert prompt(ECG).startswith("Above is a 12-lead ECG of a patient.")
    assert prompt(LABS, report="Laboratory report of a patient:\nHbA1c: 5.0 %") == (
        "Laboratory report of a patient:\nHbA1c: 5.0 %\nDoes the patient have "
        "diabetes mellitus? Answer with one phrase from the following:\n"
        "No diabetes\nDiabetes"
    )


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> FederationSummary:
    return generate_federation(tmp_path_factory.mktemp("fed-seed0"), hospitals=3, seed=0, scale=1.0)


@pytest.fixture(scope="module")
def records(federation: FederationSummary) -> Rows:
    return list(_records(federation))


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(
    federation: FederationSummary, tmp_path: Path
) -> None:
    """Regenerating with the same arguments reproduces every file byte for byte."""
    # Execute
    again = generate_federation(tmp_path / "again", hospitals=3, seed=0, scale=1.0)

    # Assert
    first, second = _files(federation.root), _files(again.root)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    """Another seed changes the annotations and the media of every kind."""
    # Execute
    base = generate_federation(tmp_path / "base", hospitals=3, seed=0, scale=0.25)
    other = generate_federation(tmp_path / "other", hospitals=3, seed=1, scale=0.25)

    # Assert
    first, second = _files(base.root), _files(other.root)
    shared = first.keys() & second.keys()
    for suffix in (".jsonl", ".png", ".npy"):
        names = [name for name in shared if name.endswith(suffix)]
        changed = [name for name in names if first[name] != second[name]]
        assert names and len(changed) / len(names) > 0.9, suffix


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


def test_records_follow_the_climb_schema(
    federation: FederationSummary, records: Rows
) -> None:
    """Every line has the CLIMB conversation layout, a valid answer and demographics."""
    for h, _, record in records:
        domain = DOMAIN_BY_KEY[record["dataset"]]
        media_keys = {"images"} if domain.media == "image" else set()
        media_keys |= {"time-series"} if domain.media == "time-series" else set()
        assert set(record) - {"bbox"} == BASE_KEYS | media_keys
        turns = record["conversations"]
        assert [turn["from"] for turn in turns] == ["human", "gpt"]
        assert _options(record) == list(domain.options)
        assert _answer(record) in domain.options
        assert turns[0]["value"].count(IMAGE_TOKEN) == len(record.get("images", []))
        assert re.fullmatch(rf"h{h}-p\d{{4}}", record["patient_id"])
        assert isinstance(record["age"], int) and 18 <= record["age"] < 90
        assert record["sex"] in {"F", "M"}


def test_media_exist_with_the_right_format(
    federation: FederationSummary, records: Rows
) -> None:
    """PNGs have the requested size and no metadata; ECGs are (12, 5000) float32."""
    size = federation.image_size
    for h, _, record in records:
        root = federation.hospital_roots[h]
        domain = DOMAIN_BY_KEY[record["dataset"]]
        for rel in record.get("images", []) + record.get("time-series", []):
            assert rel.startswith(f"{domain.root}/{domain.media_dir}/h{h}_")
            assert (root / rel).is_file()
        for rel in record.get("images", []):
            data = (root / rel).read_bytes()
            assert set(_png_chunks(data)) == ALLOWED_PNG_CHUNKS
            assert Image.open(root / rel).size == (size, size)
        for rel in record.get("time-series", []):
            signal = np.load(root / rel)
            assert signal.shape == (12, 5000) and signal.dtype == np.float32
            assert np.isfinite(signal).all()


def test_ecg_limb_leads_are_einthoven_consistent(
    federation: FederationSummary, records: Rows
) -> None:
    """III, aVR, aVL and aVF follow from I and II."""
    ecgs = [(h, r) for h, _, r in records if "time-series" in r][:20]
    assert ecgs
    for h, record in ecgs:
        x = np.load(federation.hospital_roots[h] / record["time-series"][0])
        lead_i, lead_ii, lead_iii, avr, avl, avf = x[:6].astype(np.float64)
        np.testing.assert_allclose(lead_iii, lead_ii - lead_i, atol=1e-5)
        np.testing.assert_allclose(avr, -(lead_i + lead_ii) / 2, atol=1e-5)
        np.testing.assert_allclose(avl, lead_i - lead_ii / 2, atol=1e-5)
        np.testing.assert_allclose(avf, lead_ii - lead_i / 2, atol=1e-5)


def test_bbox_marks_the_opacity_of_positive_chest_xrays(
    federation: FederationSummary, records: Rows
) -> None:
    """Exactly the Pneumonia records carry a bbox, inside the image, over brightness."""
    size = federation.image_size
    for h, _, record in records:
        positive = record["dataset"] == "synth_cxr" and _answer(record) == "Pneumonia"
        assert ("bbox" in record) == positive
        if not positive:
            continue
        x1, y1, x2, y2 = record["bbox"]
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        path = federation.hospital_roots[h] / record["images"][0]
        image = np.asarray(Image.open(path), dtype=np.float64)
        assert image[y1:y2, x1:x2].mean() > image.mean() + 30


def test_some_chest_xrays_are_frontal_lateral_pairs(
    records: Rows,
) -> None:
    """A small share of records has two images and two image tokens."""
    cxr = [r for _, _, r in records if r["dataset"] == "synth_cxr"]
    pairs = [r for r in cxr if len(r["images"]) == 2]
    assert 0 < len(pairs) < 0.1 * len(cxr)
    prompts = [r["conversations"][0]["value"] for r in pairs]
    assert all(p.startswith(f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n") for p in prompts)


def test_text_records_have_no_media(records: Rows) -> None:
    """Lab records carry the report in the prompt and no image or time series."""
    labs = [r for _, _, r in records if r["dataset"] == "synth_labs"]
    assert labs
    for record in labs:
        human = record["conversations"][0]["value"]
        assert human.startswith("Laboratory report of a patient:\n")
        assert IMAGE_TOKEN not in human and "images" not in record


# ---------------------------------------------------------------------------
# Federation structure
# ---------------------------------------------------------------------------


def test_manifest_matches_the_files(
    federation: FederationSummary, records: Rows
) -> None:
    """federation.json counts equal the JSONL line counts and name every domain."""
    manifest = json.loads(federation.manifest.read_text(encoding="utf-8"))
    actual: dict[str, dict[str, dict[str, int]]] = defaultdict(
        lambda: {split: {} for split in SPLITS}
    )
    for h, split, record in records:
        per_dataset = actual[f"hospital-{h}"][split]
        per_dataset[record["dataset"]] = per_dataset.get(record["dataset"], 0) + 1
    assert manifest["generator"] == GENERATOR_VERSION
    assert manifest["seed"] == 0 and manifest["hospitals"] == 3
    assert [d["dataset"] for d in manifest["domains"]] == list(DOMAIN_BY_KEY)
    for entry in manifest["domains"]:
        assert entry["options"] == list(DOMAIN_BY_KEY[entry["dataset"]].options)
    assert manifest["counts"] == dict(actual)
    assert load_federation(federation.root).counts == manifest["counts"]


def test_rare_domain_lives_at_exactly_one_hospital(
    federation: FederationSummary,
) -> None:
    """Only the last hospital holds fundus, and it is about 5% of its records."""
    roots = federation.hospital_roots
    holders = [h for h, root in enumerate(roots) if (root / "fundus").is_dir()]
    assert holders == [federation.hospitals - 1]
    counts = federation.counts[f"hospital-{holders[0]}"]
    fundus = sum(counts[split]["synth_fundus"] for split in SPLITS)
    total = sum(n for per_split in counts.values() for n in per_split.values())
    assert 0.02 < fundus / total < 0.1


def test_ecg_is_held_by_the_first_two_hospitals(federation: FederationSummary) -> None:
    """ECG data exists at hospitals 0 and 1 only."""
    roots = federation.hospital_roots
    holders = [h for h, root in enumerate(roots) if (root / "ecg").is_dir()]
    assert holders == [0, 1]


def test_hospitals_have_different_mixes(federation: FederationSummary) -> None:
    """Hospital 0 is chest-X-ray-heavy and hospital 1 labs-heavy (non-IID)."""
    train = {name: c["train"] for name, c in federation.counts.items()}
    assert max(train["hospital-0"], key=train["hospital-0"].__getitem__) == "synth_cxr"
    assert max(train["hospital-1"], key=train["hospital-1"].__getitem__) == "synth_labs"
    for per_domain in train.values():
        assert 300 <= sum(per_domain.values()) <= 500


def test_splits_are_about_70_10_20(federation: FederationSummary) -> None:
    """At every hospital valid is ~10% and test ~20% of the records."""
    for counts in federation.counts.values():
        sizes = {split: sum(counts[split].values()) for split in SPLITS}
        total = sum(sizes.values())
        assert 0.08 < sizes["valid"] / total < 0.14
        assert 0.17 < sizes["test"] / total < 0.25


def test_valid_and_test_are_class_balanced(
    records: Rows,
) -> None:
    """Each domain at each hospital has >= 10 test records, with equal class counts."""
    labels: dict[tuple[int, str, str], Counter[str]] = defaultdict(Counter)
    for h, split, record in records:
        labels[(h, split, record["dataset"])][_answer(record)] += 1
    for (_, split, dataset), counts in labels.items():
        options = DOMAIN_BY_KEY[dataset].options
        if split == "train":
            assert all(counts[o] > 0 for o in options)
            continue
        assert counts[options[0]] == counts[options[1]]
        if split == "test":
            assert counts.total() >= 10


def test_patients_own_one_to_three_records_in_one_split(
    records: Rows,
) -> None:
    """Some patients own several records; one patient keeps one split, age and sex."""
    owned: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    for _, split, record in records:
        owned[record["patient_id"]].append((split, record["age"], record["sex"]))
    sizes = Counter(len(v) for v in owned.values())
    assert set(sizes) == {1, 2, 3}
    assert all(len(set(v)) == 1 for v in owned.values())


# ---------------------------------------------------------------------------
# Learnability
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", list(FEATURES))
def test_a_trivial_feature_separates_the_classes(
    federation: FederationSummary,
    records: Rows,
    dataset: str,
) -> None:
    """A one-number feature with a threshold fitted on train is >= 90% right on test."""
    # Prepare
    feature = FEATURES[dataset]
    data: dict[str, tuple[list[float], list[int]]] = {s: ([], []) for s in SPLITS}
    for h, split, record in records:
        if record["dataset"] == dataset:
            data[split][0].append(feature(federation.hospital_roots[h], record))
            data[split][1].append(_label(record))
    train = (np.asarray(data["train"][0]), np.asarray(data["train"][1]))
    test = (np.asarray(data["test"][0]), np.asarray(data["test"][1]))

    # Execute
    accuracy = _stump_accuracy(train, test)

    # Assert
    assert accuracy >= 0.9


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("hospitals", [1, 2, 5])
def test_other_federation_sizes_keep_the_structure(
    tmp_path: Path, hospitals: int
) -> None:
    """Fundus stays at the last hospital, ECG at the first two, test floors hold."""
    summary = generate_federation(
        tmp_path, hospitals=hospitals, seed=3, scale=0.1, image_size=48
    )
    fundus = [n for n, c in summary.counts.items() if "synth_fundus" in c["test"]]
    ecg = [n for n, c in summary.counts.items() if "synth_ecg" in c["test"]]
    assert fundus == [f"hospital-{hospitals - 1}"]
    assert ecg == [f"hospital-{h}" for h in range(min(2, hospitals))]
    assert all(n >= 10 for c in summary.counts.values() for n in c["test"].values())
    image = next(summary.hospital_roots[0].rglob("*.png"))
    assert Image.open(image).size == (48, 48)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"hospitals": 0}, "`hospitals`"),
        ({"seed": -1}, "`seed`"),
        ({"scale": 0.0}, "`scale`"),
        ({"image_size": 16}, "`image_size`"),
    ],
)
def test_bad_arguments_are_rejected(
    tmp_path: Path, kwargs: dict[str, Any], fragment: str
) -> None:
    """Out-of-range arguments raise a ValueError that names the argument."""
    with pytest.raises(ValueError, match=fragment):
        generate_federation(tmp_path, **kwargs)


def test_non_empty_output_needs_overwrite(tmp_path: Path) -> None:
    """A federation is replaced only with overwrite=True; foreign data never is."""
    # Prepare
    generate_federation(tmp_path / "fed", hospitals=1, scale=0.1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep", encoding="utf-8")

    # Execute / Assert
    with pytest.raises(FileExistsError):
        generate_federation(tmp_path / "fed", hospitals=1, scale=0.1)
    replaced = generate_federation(
        tmp_path / "fed", hospitals=2, scale=0.1, overwrite=True
    )
    names = sorted(p.name for p in replaced.root.iterdir())
    assert names == [MANIFEST_NAME, "hospital-0", "hospital-1"]
    with pytest.raises(FileExistsError):
        generate_federation(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text(encoding="utf-8") == "keep"
