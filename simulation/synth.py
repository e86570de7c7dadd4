"""Synthetic federation of hospitals in CLIMB layout.

``generate_federation`` writes one CLIMB data root per hospital::

    <out>/hospital-<i>/<modality>/<dataset>/annotation_{train,valid,test}.jsonl
    <out>/hospital-<i>/<modality>/<dataset>/{images,signals}/h<i>_<nnnnn>[...].{png,npy}
    <out>/federation.json

Five domains (chest X-ray, dermoscopy, ECG, lab reports, and a rare fundus domain at a
single hospital) are spread unevenly over the hospitals, with different class mixes
per hospital. Output is byte-for-byte determined by the arguments: every record draws
from its own NumPy stream keyed by ``(seed, hospital, domain, record index)``, PNGs
carry no metadata chunks, and nothing machine-specific is written.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from simulation.synth_ecg import render_ecg
from simulation.synth_images import render_cxr, render_derm, render_fundus
from simulation.synth_labs import render_lab_report
from simulation.synth_spec import (
    CXR,
    DERM,
    DOMAINS,
    ECG,
    FUNDUS,
    SPLITS,
    Domain,
    FederationPlan,
    holders,
    plan_counts,
    prompt,
    split_labels,
    train_prevalence,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PLAN",
    "DOMAINS",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "FederationPlan",
    "FederationSummary",
    "generate_federation",
    "hospital_name",
    "load_federation",
]

GENERATOR_VERSION = "fedclimb-synth/2"
MANIFEST_NAME = "federation.json"
DEFAULT_PLAN = FederationPlan()
MIN_IMAGE_SIZE = 32
AGE_RANGE = (18, 90)  # inclusive lower, exclusive upper bound (years)

# First element of every seed key, so the streams of different purposes never overlap.
_STREAM_MEDIA, _STREAM_LABELS, _STREAM_PATIENTS, _STREAM_DEMOGRAPHICS = range(4)


@dataclass(frozen=True)
class FederationSummary:
    """What ``generate_federation`` wrote.

    Attributes
    ----------
    root : pathlib.Path
        The output folder that holds the hospital roots and the manifest.
    manifest : pathlib.Path
        Path of ``federation.json``.
    seed, hospitals, image_size : int
        Generation arguments.
    scale : float
        Generation argument.
    counts : mapping
        ``counts[hospital_name][split][dataset]`` record counts.
    domains : tuple of Domain
        All domains, in manifest order.
    """

    root: Path
    manifest: Path
    seed: int
    hospitals: int
    scale: float
    image_size: int
    counts: Mapping[str, Mapping[str, Mapping[str, int]]]
    domains: tuple[Domain, ...]

    @property
    def hospital_roots(self) -> tuple[Path, ...]:
        """The CLIMB data root of every hospital, in index order."""
        return tuple(self.root / hospital_name(h) for h in range(self.hospitals))

    def total(self, *, split: str | None = None, dataset: str | None = None) -> int:
        """Number of records, optionally restricted to one split and/or dataset."""
        return sum(
            n
            for per_split in self.counts.values()
            for s, per_dataset in per_split.items()
            if split in (None, s)
            for d, n in per_dataset.items()
            if dataset in (None, d)
        )


@dataclass(frozen=True)
class _Draft:
    """A planned record before its media are rendered."""

    domain: Domain
    split: str
    index: int
    label: int
    pair: bool


def hospital_name(index: int) -> str:
    """Folder name of hospital ``index`` (also its key in the manifest)."""
    return f"hospital-{index}"


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _validate(*, hospitals: int, seed: int, scale: float, image_size: int) -> None:
    if not isinstance(hospitals, int) or hospitals < 1:
        raise ValueError(f"`hospitals` must be an integer >= 1, got {hospitals!r}.")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0, got {seed!r}.")
    if not scale > 0:
        raise ValueError(
            f"`scale` must be > 0, got {scale!r}. Use e.g. 0.25 for a small federation."
        )
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"`image_size` must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}; "
            "smaller images lose the lesions that carry the labels."
        )


def _prepare_output(out: Path, *, overwrite: bool) -> None:
    """Create ``out``; refuse to mix with existing files unless told to replace."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"Output folder {out} is not empty. Choose an empty folder or pass "
                "overwrite=True to replace a previously generated federation."
            )
        if not (out / MANIFEST_NAME).is_file():
            raise FileExistsError(
                f"Output folder {out} has no {MANIFEST_NAME}, so it does not look like "
                "a generated federation; refusing to delete its contents."
            )
        for child in out.glob("hospital-*"):
            shutil.rmtree(child)
        (out / MANIFEST_NAME).unlink()
    out.mkdir(parents=True, exist_ok=True)


def _plan_drafts(
    *,
    seed: int,
    hospital: int,
    sizes: Mapping[str, Mapping[str, int]],
    plan: FederationPlan,
) -> list[_Draft]:
    """All records of one hospital with labels and pair flags, in index order."""
    drafts: list[_Draft] = []
    for d, domain in enumerate(DOMAINS):
        if domain.key not in sizes:
            continue
        rng = _rng(seed, _STREAM_LABELS, hospital, d)
        prevalence = train_prevalence(domain, hospital=hospital, plan=plan)
        index = 0
        for split in SPLITS:
            n = sizes[domain.key][split]
            labels = split_labels(rng, n=n, split=split, prevalence=prevalence)
            pairs = np.zeros(n, dtype=bool)
            if domain.key == CXR.key:
                chosen = rng.permutation(n)[: max(1, round(plan.pair_fraction * n))]
                pairs[chosen] = True
            for label, pair in zip(labels, pairs, strict=True):
                drafts.append(_Draft(domain, split, index, int(label), bool(pair)))
                index += 1
    return drafts


def _interleaved_order(members: list[_Draft], rng: np.random.Generator) -> np.ndarray:
    """A random order that spreads every domain evenly over the sequence.

    Neighbours then mostly come from different domains, so a patient who owns
    several consecutive records tends to have, say, a chest X-ray and a lab report
    rather than two conflicting lab reports.
    """
    position = np.zeros(len(members))
    for domain in DOMAINS:
        idx = [i for i, m in enumerate(members) if m.domain.key == domain.key]
        jitter = rng.uniform(size=len(idx))
        position[idx] = (rng.permutation(len(idx)) + jitter) / max(len(idx), 1)
    return np.argsort(position, kind="stable")


def _assign_patients(
    drafts: list[_Draft], *, seed: int, hospital: int, plan: FederationPlan
) -> dict[tuple[str, int], dict[str, Any]]:
    """Group each split's records into patients owning 1-3 records each.

    A patient's records all lie in one split, so a patient never straddles
    train and test. Returns the demographics per ``(dataset, index)``.
    """
    owners: dict[tuple[str, int], dict[str, Any]] = {}
    patient = 0
    for s, split in enumerate(SPLITS):
        members = [draft for draft in drafts if draft.split == split]
        rng = _rng(seed, _STREAM_PATIENTS, hospital, s)
        order = _interleaved_order(members, rng)
        cursor = 0
        while cursor < len(order):
            size = int(rng.choice(plan.patient_sizes, p=plan.patient_size_probs))
            patient += 1
            demo = _rng(seed, _STREAM_DEMOGRAPHICS, hospital, patient)
            info = {
                "patient_id": f"h{hospital}-p{patient:04d}",
                "age": int(demo.integers(*AGE_RANGE)),
                "sex": "F" if demo.uniform() < 0.5 else "M",
            }
            for i in order[cursor : cursor + size]:
                owners[(members[int(i)].domain.key, members[int(i)].index)] = info
            cursor += size
    return owners


def _save_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="PNG")


def _render_media(
    draft: _Draft, *, root: Path, hospital: int, seed: int, image_size: int
) -> dict[str, Any]:
    """Render and save the media of one record; return its media and extra fields."""
    domain = draft.domain
    rng = _rng(seed, _STREAM_MEDIA, hospital, DOMAINS.index(domain), draft.index)
    stem = f"{domain.root}/{domain.media_dir}/h{hospital}_{draft.index:05d}"
    if domain.key == CXR.key:
        frontal, bbox = render_cxr(rng, label=draft.label, size=image_size)
        paths, views = [f"{stem}.png"], [frontal]
        if draft.pair:
            lateral, _ = render_cxr(
                rng, label=draft.label, size=image_size, lateral=True
            )
            paths = [f"{stem}_frontal.png", f"{stem}_lateral.png"]
            views = [frontal, lateral]
        for rel, view in zip(paths, views, strict=True):
            _save_png(root / rel, view)
        return {"images": paths} | ({"bbox": bbox} if bbox is not None else {})
    if domain.key in (DERM.key, FUNDUS.key):
        render = render_derm if domain.key == DERM.key else render_fundus
        _save_png(root / f"{stem}.png", render(rng, label=draft.label, size=image_size))
        return {"images": [f"{stem}.png"]}
    if domain.key == ECG.key:
        np.save(root / f"{stem}.npy", render_ecg(rng, label=draft.label))
        return {"time-series": [f"{stem}.npy"]}
    return {"report": render_lab_report(rng, label=draft.label)}


def _record(
    draft: _Draft, media: Mapping[str, Any], owner: Mapping[str, Any]
) -> dict[str, Any]:
    """The CLIMB record (key order as in CLIMB annotation files)."""
    domain = draft.domain
    n_images = len(media.get("images", []))
    human = prompt(domain, n_images=n_images, report=media.get("report", ""))
    record: dict[str, Any] = {
        "conversations": [
            {"from": "human", "value": human},
            {"from": "gpt", "value": domain.options[draft.label]},
        ]
    }
    for key in ("images", "time-series"):
        if key in media:
            record[key] = media[key]
    record |= {"dataset": domain.key, **owner}
    if "bbox" in media:
        record["bbox"] = media["bbox"]
    return record


def _write_hospital(
    out: Path,
    *,
    hospital: int,
    seed: int,
    image_size: int,
    sizes: Mapping[str, Mapping[str, int]],
    plan: FederationPlan,
) -> dict[str, dict[str, dict[str, int]]]:
    """Write one hospital's data root; return its label counts per split and dataset."""
    root = out / hospital_name(hospital)
    drafts = _plan_drafts(seed=seed, hospital=hospital, sizes=sizes, plan=plan)
    owners = _assign_patients(drafts, seed=seed, hospital=hospital, plan=plan)
    lines: dict[tuple[str, str], list[str]] = {}
    labels: dict[str, dict[str, dict[str, int]]] = {split: {} for split in SPLITS}
    for domain in DOMAINS:
        if domain.key in sizes and domain.media_dir:
            (root / domain.root / domain.media_dir).mkdir(parents=True, exist_ok=True)
    for draft in drafts:
        key = draft.domain.key
        media = _render_media(
            draft, root=root, hospital=hospital, seed=seed, image_size=image_size
        )
        record = _record(draft, media, owners[(key, draft.index)])
        lines.setdefault((key, draft.split), []).append(json.dumps(record) + "\n")
        options = draft.domain.options
        per_class = labels[draft.split].setdefault(key, dict.fromkeys(options, 0))
        per_class[options[draft.label]] += 1
    for domain in DOMAINS:
        if domain.key not in sizes:
            continue
        (root / domain.root).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            path = root / domain.root / f"annotation_{split}.jsonl"
            with path.open("w", encoding="utf-8", newline="\n") as handle:
                handle.writelines(lines.get((domain.key, split), []))
    return labels


def _manifest(
    *,
    seed: int,
    hospitals: int,
    scale: float,
    image_size: int,
    counts: Mapping[str, Any],
    labels: Mapping[str, Any],
    plan: FederationPlan,
) -> dict[str, Any]:
    domains = [
        {
            "dataset": domain.key,
            "modality": domain.modality,
            "media": domain.media,
            "options": list(domain.options),
            "holders": [
                hospital_name(h)
                for h in holders(domain, hospitals=hospitals, plan=plan)
            ],
        }
        for domain in DOMAINS
    ]
    return {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "hospitals": hospitals,
        "scale": scale,
        "image_size": image_size,
        "domains": domains,
        "counts": counts,
        "label_counts": labels,
    }


def generate_federation(
    out: Path,
    *,
    hospitals: int = 3,
    seed: int = 0,
    scale: float = 1.0,
    image_size: int = 64,
    overwrite: bool = False,
    plan: FederationPlan = DEFAULT_PLAN,
) -> FederationSummary:
    """Write a synthetic federation of hospitals in CLIMB layout.

    Parameters
    ----------
    out : pathlib.Path
        Output folder; created if missing, must be empty unless ``overwrite``.
    hospitals : int
        Number of hospitals (>= 1). Chest X-ray, dermoscopy and labs are held by all,
        ECG by hospitals 0 and 1, the rare fundus domain by the last hospital only.
    seed : int
        Seed (>= 0); the same arguments always give byte-identical files.
    scale : float
        Multiplier on all record counts (floors keep at least 10 balanced test
        records per domain and hospital).
    image_size : int
        Side of the square PNG images in pixels (>= 32).
    overwrite : bool
        Replace a federation previously generated into ``out``.
    plan : FederationPlan
        Sizes, class mixes and patient structure.

    Returns
    -------
    FederationSummary
        Paths and per-hospital, per-split, per-dataset record counts.

    Raises
    ------
    ValueError
        If an argument is out of range.
    FileExistsError
        If ``out`` is not empty and ``overwrite`` is false, or holds something other
        than a generated federation.
    """
    _validate(hospitals=hospitals, seed=seed, scale=scale, image_size=image_size)
    out = Path(out)
    _prepare_output(out, overwrite=overwrite)
    sizes = plan_counts(hospitals=hospitals, scale=scale, plan=plan)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    labels: dict[str, Any] = {}
    for h in range(hospitals):
        name = hospital_name(h)
        labels[name] = _write_hospital(
            out, hospital=h, seed=seed, image_size=image_size, sizes=sizes[h], plan=plan
        )
        counts[name] = {
            split: {key: per_split[split] for key, per_split in sizes[h].items()}
            for split in SPLITS
        }
    manifest = _manifest(
        seed=seed,
        hospitals=hospitals,
        scale=scale,
        image_size=image_size,
        counts=counts,
        labels=labels,
        plan=plan,
    )
    manifest_path = out / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    summary = FederationSummary(
        root=out,
        manifest=manifest_path,
        seed=seed,
        hospitals=hospitals,
        scale=scale,
        image_size=image_size,
        counts=counts,
        domains=DOMAINS,
    )
    logger.info(
        "Synthetic federation: %d hospitals, %d records (train %d), seed %d",
        hospitals,
        summary.total(),
        summary.total(split="train"),
        seed,
    )
    return summary


def load_federation(out: Path) -> FederationSummary:
    """Summary of a federation generated earlier into ``out``, read from its manifest.

    Raises
    ------
    FileNotFoundError
        If ``out`` has no manifest.
    ValueError
        If the manifest was written by a different generator version.
    """
    out = Path(out)
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MANIFEST_NAME} in {out}; run generate_federation first."
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("generator") != GENERATOR_VERSION:
        raise ValueError(
            f"{path} was written by generator {manifest.get('generator')!r}, expected "
            f"{GENERATOR_VERSION!r}. Regenerate the federation."
        )
    return FederationSummary(
        root=out,
        manifest=path,
        seed=manifest["seed"],
        hospitals=manifest["hospitals"],
        scale=manifest["scale"],
        image_size=manifest["image_size"],
        counts=manifest["counts"],
        domains=DOMAINS,
    )
