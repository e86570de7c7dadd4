"""Domains, prompts and record-count planning of the synthetic CLIMB federation.

Everything here is pure: which domains exist, which hospital holds which domain, how
many records of each class go into each split, and how the CLIMB-style question of a
record is phrased. Rendering of the media lives in ``synth_images``, ``synth_ecg`` and
``synth_labs``; writing files lives in ``synth``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

MediaKind = Literal["image", "time-series", "text"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")
IMAGE_TOKEN = "<image>"
OPTIONS_LEAD = "Answer with one phrase from the following:"


@dataclass(frozen=True)
class Domain:
    """One synthetic clinical domain (one CLIMB dataset).

    Attributes
    ----------
    key : str
        Dataset name, also the ``"dataset"`` field of every record and the domain key.
    modality : str
        First path component under a hospital root, e.g. ``"chest_xray"``.
    media : {"image", "time-series", "text"}
        What a record carries besides its question.
    options : tuple of str
        Answer options in prompt order: ``options[0]`` is the negative class,
        ``options[1]`` the positive class.
    question : str
        Text of the question after the media token(s), up to and excluding the
        option list.
    media_dir : str
        Folder under ``<modality>/<key>/`` that holds the media files ("" for text).
    """

    key: str
    modality: str
    media: MediaKind
    options: tuple[str, str]
    question: str
    media_dir: str = ""

    @property
    def root(self) -> str:
        """Path of the dataset folder relative to a hospital root."""
        return f"{self.modality}/{self.key}"


CXR = Domain(
    key="synth_cxr",
    modality="chest_xray",
    media="image",
    options=("Normal", "Pneumonia"),
    question=(
        "Above is a chest X-ray image of a patient. "
        "What is the diagnosis of the patient in the X-ray image?"
    ),
    media_dir="images",
)
DERM = Domain(
    key="synth_derm",
    modality="dermoscopy",
    media="image",
    options=("Benign nevus", "Melanoma"),
    question=(
        "Above is a dermoscopy image of a patient. "
        "What is the diagnosis of the patient in the dermoscopy image?"
    ),
    media_dir="images",
)
ECG = Domain(
    key="synth_ecg",
    modality="ecg",
    media="time-series",
    options=("Normal sinus rhythm", "Tachycardia"),
    question=(
        "Above is a 12-lead ECG of a patient. "
        "What is the diagnosis of the patient based on the ECG?"
    ),
    media_dir="signals",
)
LABS = Domain(
    key="synth_labs",
    modality="lab",
    media="text",
    options=("No diabetes", "Diabetes"),
    question="Does the patient have diabetes mellitus?",
)
FUNDUS = Domain(
    key="synth_fundus",
    modality="fundus",
    media="image",
    options=("No DR", "Diabetic retinopathy"),
    question=(
        "Above is a fundus image of a patient. "
        "Does the patient have diabetic retinopathy in the fundus image?"
    ),
    media_dir="images",
)
DOMAINS: tuple[Domain, ...] = (CXR, DERM, ECG, LABS, FUNDUS)
CXR_PAIR_QUESTION = (
    "Above are frontal and lateral chest X-ray images of a patient. "
    "What is the diagnosis of the patient in the X-ray images?"
)


def _default_profiles() -> tuple[Mapping[str, int], ...]:
    return (
        # hospital 0, 3, 6, ...: cxr-heavy
        {CXR.key: 190, LABS.key: 100, DERM.key: 50, ECG.key: 60},
        # hospital 1, 4, 7, ...: labs-heavy
        {CXR.key: 90, LABS.key: 190, DERM.key: 50, ECG.key: 70},
        # hospital 2, 5, 8, ...: dermatology-leaning (ECG used only if it holds ECG)
        {CXR.key: 140, LABS.key: 130, DERM.key: 110, ECG.key: 60},
    )


def _default_prevalence() -> Mapping[str, float]:
    # Near-balanced classes: a policy that cannot yet see the class learns the majority
    # answer first, and GRPO-style RL then loses the signal of the minority (every group of
    # K identical wrong answers has zero advantage). Skew is across hospitals instead.
    return {CXR.key: 0.5, DERM.key: 0.5, ECG.key: 0.5, LABS.key: 0.5, FUNDUS.key: 0.5}


@dataclass(frozen=True)
class FederationPlan:
    """Sizes and proportions of the synthetic federation.

    Attributes
    ----------
    profiles : tuple of mapping
        Train-record counts per domain at ``scale=1``; hospital ``i`` uses
        ``profiles[i % len(profiles)]`` (this is the non-IID quantity skew). The ECG
        count only applies to a hospital that holds ECG.
    rare_train : int
        Train records of the rare fundus domain at the single hospital that holds it.
    ecg_holders : int
        ECG is held by hospitals ``0 .. ecg_holders - 1``.
    valid_per_train, test_per_train : float
        Valid and test sizes as a fraction of the train size (1/7 and 2/7 give the
        70/10/20 split of every domain at every hospital).
    min_train, min_valid, min_test : int
        Floors per domain per hospital; valid and test sizes are also rounded up to
        an even number so both classes get the same count.
    prevalence : mapping
        Positive-class share of each domain's train split.
    prevalence_shift : float
        Hospital ``i`` shifts every train prevalence by
        ``prevalence_shift * (i % 3 - 1)`` (non-IID label skew).
    pair_fraction : float
        Share of chest X-ray records that are a frontal + lateral image pair.
    patient_sizes, patient_size_probs : tuple
        How many records one patient owns, and how often.
    """

    profiles: tuple[Mapping[str, int], ...] = field(default_factory=_default_profiles)
    rare_train: int = 20
    ecg_holders: int = 2
    valid_per_train: float = 1 / 7
    test_per_train: float = 2 / 7
    min_train: int = 4
    min_valid: int = 2
    min_test: int = 10
    prevalence: Mapping[str, float] = field(default_factory=_default_prevalence)
    prevalence_shift: float = 0.06
    pair_fraction: float = 0.06
    patient_sizes: tuple[int, ...] = (1, 2, 3)
    patient_size_probs: tuple[float, ...] = (0.7, 0.2, 0.1)


def holders(domain: Domain, *, hospitals: int, plan: FederationPlan) -> tuple[int, ...]:
    """Indices of the hospitals that hold ``domain``.

    Chest X-ray, dermoscopy and labs are everywhere, ECG at the first
    ``plan.ecg_holders`` hospitals, the rare fundus domain only at the last one.
    """
    if domain.key == FUNDUS.key:
        return (hospitals - 1,)
    if domain.key == ECG.key:
        return tuple(range(min(plan.ecg_holders, hospitals)))
    return tuple(range(hospitals))


def _round_even_up(value: float) -> int:
    n = int(np.ceil(value))
    return n + (n % 2)


def split_sizes(
    train_base: int, *, scale: float, plan: FederationPlan
) -> dict[str, int]:
    """Records per split for one domain at one hospital.

    Parameters
    ----------
    train_base : int
        Train records at ``scale=1``.
    scale : float
        Multiplier on every count (floors still apply).
    plan : FederationPlan
        Split fractions and floors.

    Returns
    -------
    dict
        ``{"train": n, "valid": n, "test": n}``; valid and test are even.
    """
    train = max(plan.min_train, round(train_base * scale))
    valid = _round_even_up(max(plan.min_valid, train * plan.valid_per_train))
    test = _round_even_up(max(plan.min_test, train * plan.test_per_train))
    return {"train": train, "valid": valid, "test": test}


def plan_counts(
    *, hospitals: int, scale: float, plan: FederationPlan
) -> dict[int, dict[str, dict[str, int]]]:
    """Record counts of the whole federation.

    Returns
    -------
    dict
        ``counts[hospital][domain_key][split]``; a hospital lists only the domains it
        holds, in the order of ``DOMAINS``.
    """
    counts: dict[int, dict[str, dict[str, int]]] = {}
    for h in range(hospitals):
        profile = plan.profiles[h % len(plan.profiles)]
        counts[h] = {}
        for domain in DOMAINS:
            if h not in holders(domain, hospitals=hospitals, plan=plan):
                continue
            base = plan.rare_train if domain.key == FUNDUS.key else profile[domain.key]
            counts[h][domain.key] = split_sizes(base, scale=scale, plan=plan)
    return counts


def train_prevalence(domain: Domain, *, hospital: int, plan: FederationPlan) -> float:
    """Positive-class share in ``domain``'s train split at ``hospital``."""
    shift = plan.prevalence_shift * (hospital % 3 - 1)
    return float(np.clip(plan.prevalence[domain.key] + shift, 0.05, 0.95))


def split_labels(
    rng: np.random.Generator, *, n: int, split: str, prevalence: float
) -> np.ndarray:
    """Shuffled 0/1 labels: balanced in valid and test, ``prevalence`` in train.

    Train keeps at least one record of each class when ``n >= 2``.
    """
    if split == "train":
        positives = int(np.clip(round(n * prevalence), min(1, n - 1), max(n - 1, 0)))
    else:
        positives = n // 2
    labels = np.zeros(n, dtype=np.int64)
    labels[:positives] = 1
    return rng.permutation(labels)


def prompt(domain: Domain, *, n_images: int = 1, report: str = "") -> str:
    """The human turn of a record, in CLIMB phrasing.

    Parameters
    ----------
    domain : Domain
        The record's domain.
    n_images : int
        Number of ``<image>`` tokens for image domains (2 gives the chest X-ray pair
        question).
    report : str
        Lab report text that precedes the question of a text record.
    """
    options = "\n".join(domain.options)
    if domain.media == "image":
        question = CXR_PAIR_QUESTION if n_images == 2 else domain.question
        tokens = "".join(f"{IMAGE_TOKEN}\n" for _ in range(n_images))
        return f"{tokens}{question} {OPTIONS_LEAD}\n{options}"
    if domain.media == "text":
        return f"{report}\n{domain.question} {OPTIONS_LEAD}\n{options}"
    return f"{domain.question} {OPTIONS_LEAD}\n{options}"
