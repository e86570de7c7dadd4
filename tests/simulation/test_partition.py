"""Partitioning a real CLIMB root into simulated hospitals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from common.climb.records import load_records
from common.climb.validate import validate_root
from simulation.partition import partition_root
from simulation.synth import generate_federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed")
    generate_federation(root, hospitals=3, seed=0, scale=0.25)
    return root


def _lines(root: Path, split: str) -> Counter[str]:
    return Counter(f"{r.id.split(':')[0]}|{r.prompt}|{r.images}|{r.time_series}" for r in load_records(root, split))


@pytest.mark.parametrize("mode", ["domain", "dirichlet"])
def test_every_record_lands_in_exactly_one_hospital_and_media_resolve(federation: Path, tmp_path: Path, mode: str) -> None:
    source = federation / "hospital-0"
    roots = partition_root(source, tmp_path, hospitals=3, mode=mode, alpha=0.3, seed=1)  # type: ignore[arg-type]
    assert [r.name for r in roots] == ["hospital-0", "hospital-1", "hospital-2"]
    for split in ("train", "valid", "test"):
        total: Counter[str] = Counter()
        for r in roots:
            total += _lines(r, split)
        assert total == _lines(source, split)
    for r in roots:
        report = validate_root(r)
        assert report.ok, report.invalid[:3]


def test_domain_skew_gives_each_domain_a_home(federation: Path, tmp_path: Path) -> None:
    roots = partition_root(federation / "hospital-0", tmp_path, hospitals=2, mode="domain", seed=0)
    per_domain = {}
    for h, r in enumerate(roots):
        for rec in load_records(r, "train"):
            per_domain.setdefault(rec.domain, Counter())[h] += 1
    # hospital-0 of the synthetic federation holds cxr, derm, ecg, labs; sorted, domain j's
    # home is hospital j mod 2 and it keeps about DOMAIN_SHARE = 80% there.
    for j, d in enumerate(sorted(per_domain)):
        counts = per_domain[d]
        home = counts[j % 2] / sum(counts.values())
        assert home > 0.6, (d, counts)


def test_dirichlet_with_small_alpha_skews_labels(federation: Path, tmp_path: Path) -> None:
    roots = partition_root(federation / "hospital-1", tmp_path, hospitals=3, mode="dirichlet", alpha=0.05, seed=3)
    labs = [Counter(r.answer_text for r in load_records(root, "train") if r.domain == "synth_labs") for root in roots]
    # with alpha = 0.05 almost every (domain, label) group sits at one hospital
    for label in ("Diabetes", "No diabetes"):
        shares = sorted((c[label] for c in labs), reverse=True)
        assert shares[0] / sum(shares) > 0.8, labs


def test_folders_mode_uses_existing_hospital_folders(federation: Path) -> None:
    roots = partition_root(federation, federation / "unused", hospitals=3, mode="folders")
    assert [r.name for r in roots] == ["hospital-0", "hospital-1", "hospital-2"]
    with pytest.raises(ValueError, match="--hospitals 3"):
        partition_root(federation, federation / "unused", hospitals=2, mode="folders")
    with pytest.raises(ValueError, match="one CLIMB root per hospital"):
        partition_root(federation / "hospital-0", federation / "unused", hospitals=1, mode="folders")


def test_hospital_roots_name_their_source_as_the_only_linked_root(federation: Path, tmp_path: Path) -> None:
    """The links into the source pass the data-root boundary through linked_roots.txt, not an exception."""
    source = federation / "hospital-0"
    roots = partition_root(source, tmp_path, hospitals=2, mode="domain", seed=0)
    for root in roots:
        assert (root / "linked_roots.txt").read_text(encoding="utf-8") == f"{source.resolve()}\n"
    (roots[0] / "linked_roots.txt").unlink()
    report = validate_root(roots[0])
    assert report.valid == 0 or all("outside the data root" in p.reason for p in report.invalid)
    assert any("outside the data root" in p.reason for p in report.invalid)


def test_a_source_with_its_own_linked_roots_is_never_written_through(federation: Path, tmp_path: Path) -> None:
    source, shared = tmp_path / "source", tmp_path / "shared"
    shared.mkdir()
    generate_federation(source, hospitals=1, seed=0, scale=0.1)
    source = source / "hospital-0"
    (source / "linked_roots.txt").write_text(f"{shared}\n", encoding="utf-8")
    roots = partition_root(source, tmp_path / "parts", hospitals=2, mode="domain", seed=0)
    assert (source / "linked_roots.txt").read_text(encoding="utf-8") == f"{shared}\n"
    for root in roots:
        assert not (root / "linked_roots.txt").is_symlink()
        assert (root / "linked_roots.txt").read_text().splitlines() == [str(source.resolve()), str(shared.resolve())]


def test_hostile_lines_in_the_source_are_skipped_not_fatal(tmp_path: Path) -> None:
    generate_federation(tmp_path / "src", hospitals=1, seed=0, scale=0.1)
    source = tmp_path / "src" / "hospital-0"
    path = source / "lab" / "synth_labs" / "annotation_train.jsonl"
    with path.open("ab") as f:
        f.write(b"[" * 200_000 + b"]" * 200_000 + b"\n" + b'{"age": ' + b"9" * 5000 + b"}\n" + b"\xff\xfe\n")
    roots = partition_root(source, tmp_path / "parts", hospitals=2, mode="domain", seed=0)
    assert sum(len(load_records(r, "train")) for r in roots) == len(load_records(source, "train"))


def test_partition_keeps_the_lines_the_configured_line_limit_allows(federation: Path, tmp_path: Path) -> None:
    """data.max_line_bytes reaches the partition: a line the hospitals accept is not dropped on the way."""
    source = federation / "hospital-0"
    longest = max(len(line.encode()) + 1 for p in source.rglob("annotation_train.jsonl")
                  for line in p.read_text().splitlines())
    kept = partition_root(source, tmp_path / "a", hospitals=2, mode="domain", max_line_bytes=longest)
    assert sum(sum(_lines(r, "train").values()) for r in kept) == sum(_lines(source, "train").values())
    short = partition_root(source, tmp_path / "b", hospitals=2, mode="domain", max_line_bytes=longest - 2)
    assert sum(sum(_lines(r, "train").values()) for r in short) < sum(_lines(source, "train").values())
