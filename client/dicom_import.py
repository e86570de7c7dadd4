"""Convert a hospital's DICOM folder plus a labels CSV into a CLIMB-format dataset.

Output layout (paths in records are relative to ``out_root``)::

    <out_root>/<modality>/<dataset>/annotation_train.jsonl
    <out_root>/<modality>/<dataset>/annotation_valid.jsonl
    <out_root>/<modality>/<dataset>/annotation_test.jsonl
    <out_root>/<modality>/<dataset>/images/<hash>.png

One record per labelled DICOM instance::

    {"conversations": [{"from": "human", "value": "<image>\\n<question>\\n<opt1>\\n<opt2>"},
                       {"from": "gpt", "value": "<answer>"}],
     "images": ["<modality>/<dataset>/images/<hash>.png"],
     "dataset": "<dataset>", "patient_id": "<pseudonym>", "age": 42, "sex": "F"}

- A single-frame instance gives one PNG; a multi-frame instance gives ``n_frames``
  uniformly spaced frames (:func:`common.climb.sampling.uniform_indices`), each
  its own PNG and its own ``<image>`` token, in frame order.
- ``modality`` defaults to the lowercased DICOM Modality tag of each file (``CT`` ->
  ``ct``, ``MR`` -> ``mr``, ``CR`` -> ``cr``); pass CLIMB's folder name (``mri``,
  ``chest_xray``, ...) explicitly when you know it. ``dataset`` defaults to the
  DICOM folder's name, sanitised.
- Multi-label answers (``a|b`` in the CSV) are joined with ``", "``. The options
  default to the sorted set of every label in the CSV.

Privacy: no patient name, patient ID, birth date, accession number, UID or date
is written anywhere under ``out_root`` (records, file names, PNG metadata). File
names are keyed hashes of SOPInstanceUID and frame; ``patient_id`` is
HMAC-SHA256(salt, PatientID) truncated, so a patient keeps the same pseudonym
across runs with the same salt. The salt is a hospital secret: pass it, or name
a salt file outside ``out_root`` (created on first use). All of a patient's
records go to one split, chosen from the pseudonym. Ages are whole years, 90 and
over reported as ``"90+"``. Pixel data with burned-in annotations
(BurnedInAnnotation = YES) is skipped unless ``skip_burned_in=False``.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from common.climb.dicom import dataset_frames, frame_count, is_dicom_file, read_dicom
from common.climb.errors import MediaError
from common.climb.sampling import DEFAULT_FRAMES, uniform_indices

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
KEY_COLUMNS = ("SOPInstanceUID", "StudyInstanceUID", "file")
LABEL_COLUMN = "label"
LABEL_SEPARATOR = "|"
ANSWER_SEPARATOR = ", "
IMAGE_TOKEN = "<image>"
PSEUDONYM_HEX = 16
AGE_CAP = 90
SALT_BYTES = 32
SEXES = ("M", "F", "O")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
DEFAULT_DATASET = "dicom_import"
UNKNOWN_MODALITY = "other"
MIN_IDENTIFIER_LENGTH = 3
SPLIT_TOLERANCE = 1e-6


@dataclass
class ConversionSummary:
    """What :func:`convert_dicom_folder` did.

    Attributes
    ----------
    out_root : Path
        The CLIMB data root written to.
    options : list of str
        Answer options listed after the question.
    files_seen : int
        Files found under the DICOM folder.
    written : dict
        ``"<modality>/<dataset>"`` -> split -> number of records.
    patients : dict
        split -> number of distinct patients.
    skipped_not_dicom : list of (str, str)
        (path relative to the DICOM folder, reason).
    skipped_unlabelled : list of str
        DICOM files with no label row.
    skipped_undecodable : list of (str, str)
        Labelled DICOM files whose pixels could not be used, with the reason.
    unmatched_labels : list of str
        Label CSV keys that matched no DICOM file.
    """

    out_root: Path
    options: list[str]
    files_seen: int = 0
    written: dict[str, dict[str, int]] = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)
    skipped_not_dicom: list[tuple[str, str]] = field(default_factory=list)
    skipped_unlabelled: list[str] = field(default_factory=list)
    skipped_undecodable: list[tuple[str, str]] = field(default_factory=list)
    unmatched_labels: list[str] = field(default_factory=list)

    @property
    def records_written(self) -> int:
        """Total number of records over all folders and splits."""
        return sum(sum(splits.values()) for splits in self.written.values())

    def report(self) -> str:
        """A short multi-line human-readable report (meant for the hospital operator).

        Returns
        -------
        str
            Counts per folder and split, then the skip counts and reasons.
        """
        lines = [f"{self.records_written} records written under {self.out_root} from {self.files_seen} files"]
        for folder, splits in sorted(self.written.items()):
            counts = ", ".join(f"{split} {splits.get(split, 0)}" for split in SPLITS)
            lines.append(f"  {folder}: {counts}")
        lines.append(f"  patients per split: {', '.join(f'{s} {self.patients.get(s, 0)}' for s in SPLITS)}")
        lines.append(f"skipped: {len(self.skipped_not_dicom)} not DICOM, {len(self.skipped_unlabelled)} without label, "
                     f"{len(self.skipped_undecodable)} unusable pixels")
        lines += [f"  unusable: {_prefixed(path, reason)}" for path, reason in self.skipped_undecodable]
        if self.unmatched_labels:
            keys = ", ".join(self.unmatched_labels)
            lines.append(f"{len(self.unmatched_labels)} label rows matched no DICOM file: {keys}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LabelTable:
    """The parsed labels CSV.

    Attributes
    ----------
    key_column : str
        One of ``SOPInstanceUID``, ``StudyInstanceUID``, ``file``.
    labels : dict
        Key -> list of labels (in CSV order).
    """

    key_column: str
    labels: dict[str, list[str]]

    def all_labels(self) -> list[str]:
        """Sorted distinct labels over all rows."""
        return sorted({label for labels in self.labels.values() for label in labels})


@dataclass(frozen=True)
class _Settings:
    """Validated conversion settings shared by the per-file steps."""

    salt: bytes
    question: str
    options: list[str]
    modality: str | None
    dataset: str
    fractions: tuple[float, float, float]
    n_frames: int
    skip_burned_in: bool
    out_root: Path


@dataclass(frozen=True)
class _Source:
    """Header facts of one DICOM file (identifiers stay in memory, never in the output)."""

    path: Path
    rel: str
    sop_uid: str
    study_uid: str
    patient_key: str
    modality: str
    age: int | str | None
    sex: str | None
    identifiers: tuple[str, ...]


def convert_dicom_folder(
    dicom_dir: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    question: str,
    *,
    salt: bytes | str | None = None,
    salt_file: str | os.PathLike[str] | None = None,
    options: Sequence[str] | None = None,
    modality: str | None = None,
    dataset: str | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    n_frames: int = DEFAULT_FRAMES,
    skip_burned_in: bool = True,
) -> ConversionSummary:
    """Convert labelled DICOM instances into a de-identified CLIMB dataset.

    Parameters
    ----------
    dicom_dir : str or os.PathLike
        Folder walked recursively; non-DICOM files are skipped and counted.
    out_root : str or os.PathLike
        CLIMB data root; ``<modality>/<dataset>/`` is created inside it.
    labels_csv : str or os.PathLike
        CSV with a header, one key column (``SOPInstanceUID``, ``StudyInstanceUID`` or
        ``file``: a file name or a path relative to ``dicom_dir``) and a ``label``
        column (``|`` separates multiple labels).
    question : str
        Question text placed after the ``<image>`` tokens.
    salt : bytes or str, optional
        The hospital's secret key for pseudonyms and file names.
    salt_file : str or os.PathLike, optional
        File holding the salt as hex, created with a fresh random salt if missing;
        must lie outside ``out_root``. Give exactly one of ``salt`` / ``salt_file``.
    options : sequence of str, optional
        Answer options (default: sorted distinct labels of the CSV); every label must be one.
    modality : str, optional
        Output modality folder (default: each file's lowercased Modality tag).
    dataset : str, optional
        Output dataset folder (default: the sanitised name of ``dicom_dir``).
    split_fractions : (train, valid, test)
        Fractions of patients per split; non-negative, summing to 1.
    n_frames : int
        Frames sampled from a multi-frame instance.
    skip_burned_in : bool
        Skip instances flagged BurnedInAnnotation = YES (text in the pixels may identify the patient).

    Returns
    -------
    ConversionSummary
        Counts, skips and unmatched label keys.

    Raises
    ------
    ValueError
        Bad arguments, a malformed labels CSV, or a labels/options mismatch.
    """
    dicom_dir, out_root = Path(dicom_dir), Path(out_root)
    if not dicom_dir.is_dir():
        raise ValueError(f"DICOM folder {dicom_dir} does not exist or is not a folder")
    _check_question(question)
    _check_name("modality", modality)
    _check_name("dataset", dataset)
    if n_frames < 1:
        raise ValueError(f"n_frames {n_frames} must be >= 1")
    fractions = _check_fractions(split_fractions)
    key = _resolve_salt(salt, salt_file, out_root)
    table = read_labels(labels_csv)
    option_list = _check_options(options, table)
    summary = ConversionSummary(out_root=out_root, options=option_list)
    sources = _scan(dicom_dir, out_root, summary)
    settings = _Settings(
        salt=key,
        question=question,
        options=option_list,
        modality=modality,
        dataset=dataset or _default_dataset_name(dicom_dir, sources),
        fractions=fractions,
        n_frames=n_frames,
        skip_burned_in=skip_burned_in,
        out_root=out_root,
    )
    records = _convert(_match_labels(sources, table, summary), settings, summary)
    _write_annotations(records, out_root, summary)
    logger.info("%s", summary.report())
    return summary


def read_labels(path: str | os.PathLike[str]) -> LabelTable:
    """Parse a labels CSV (see :func:`convert_dicom_folder`).

    Parameters
    ----------
    path : str or os.PathLike
        The CSV (UTF-8, an optional byte-order mark is ignored).

    Returns
    -------
    LabelTable
        Key column and labels per key.

    Raises
    ------
    ValueError
        Missing file, no or several key columns, no ``label`` column, an empty label,
        or one key given two different label sets.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"labels CSV {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        keys = [name for name in header if name in KEY_COLUMNS]
        if len(keys) != 1 or LABEL_COLUMN not in header:
            raise ValueError(
                f"labels CSV {path} has columns {header}; it needs exactly one of {list(KEY_COLUMNS)} and a "
                f"'{LABEL_COLUMN}' column"
            )
        labels: dict[str, list[str]] = {}
        for line, row in enumerate(reader, start=2):
            row = {(name or "").strip(): (value or "") for name, value in row.items()}
            _add_label_row(labels, row[keys[0]].strip(), row[LABEL_COLUMN], path, line)
    return LabelTable(keys[0], labels)


def load_or_create_salt(path: str | os.PathLike[str]) -> bytes:
    """Read a hex salt from ``path``, or create the file with a fresh random salt.

    Parameters
    ----------
    path : str or os.PathLike
        The salt file (its folder must exist). A new file is created with mode 0600.

    Returns
    -------
    bytes
        The salt.

    Raises
    ------
    ValueError
        The file exists but does not hold hex text.
    """
    path = Path(path)
    if path.is_file():
        text = path.read_text(encoding="ascii", errors="replace").strip()
        try:
            salt = bytes.fromhex(text)
        except ValueError as exc:
            raise ValueError(
                f"salt file {path} must hold one hex string; restore it from the hospital's backup"
            ) from exc
        if not salt:
            raise ValueError(f"salt file {path} is empty; restore it from the hospital's backup")
        return salt
    salt = secrets.token_bytes(SALT_BYTES)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(salt.hex() + "\n")
    logger.info("created a new salt file %s; keep it secret and back it up", path)
    return salt


def pseudonym(salt: bytes, patient_id: str) -> str:
    """Keyed pseudonym of a patient: HMAC-SHA256(salt, PatientID), first 16 hex characters.

    Parameters
    ----------
    salt : bytes
        Hospital secret.
    patient_id : str
        The PatientID.

    Returns
    -------
    str
        16 lowercase hex characters.
    """
    return hmac.new(salt, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def image_stem(salt: bytes, sop_instance_uid: str, frame: int) -> str:
    """File name (without suffix) of one frame: HMAC-SHA256(salt, "<uid>/<frame>"), 16 hex characters.

    Parameters
    ----------
    salt : bytes
        Hospital secret.
    sop_instance_uid : str
        The instance's SOPInstanceUID.
    frame : int
        Frame index within the instance.

    Returns
    -------
    str
        16 lowercase hex characters.
    """
    message = f"{sop_instance_uid}/{frame}".encode("utf-8")
    return hmac.new(salt, message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def assign_split(patient_pseudonym: str, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """Choose a split from a pseudonym: its hex value as a number in [0, 1) against cumulative fractions.

    Parameters
    ----------
    patient_pseudonym : str
        Output of :func:`pseudonym`.
    fractions : (train, valid, test)
        Split fractions summing to 1.

    Returns
    -------
    str
        ``"train"``, ``"valid"`` or ``"test"``.
    """
    position = int(patient_pseudonym, 16) / 16 ** len(patient_pseudonym)
    cumulative = 0.0
    for split, fraction in zip(SPLITS, fractions):
        cumulative += fraction
        if position < cumulative:
            return split
    return next(split for split, fraction in reversed(list(zip(SPLITS, fractions))) if fraction > 0)


def parse_patient_age(value: str | None) -> int | None:
    """Whole years from a DICOM AS value: ``"042Y"`` -> 42; months, weeks and days -> 0.

    Parameters
    ----------
    value : str or None
        PatientAge (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``).

    Returns
    -------
    int or None
        None when absent or malformed.
    """
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", str(value or "").upper())
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2)
    return number if unit == "Y" else number // 12 if unit == "M" else 0


def age_from_dates(birth_date: str | None, study_date: str | None) -> int | None:
    """Completed years between two DICOM DA values (``YYYYMMDD``).

    Parameters
    ----------
    birth_date, study_date : str or None
        PatientBirthDate and StudyDate.

    Returns
    -------
    int or None
        None when either is absent or malformed, or the study precedes the birth.
    """
    born, studied = _parse_da(birth_date), _parse_da(study_date)
    if born is None or studied is None or studied < born:
        return None
    return studied.year - born.year - ((studied.month, studied.day) < (born.month, born.day))


def report_age(years: int | None, cap: int = AGE_CAP) -> int | str | None:
    """Age as written to records: whole years, ``"<cap>+"`` at or above ``cap`` (HIPAA safe harbour).

    Parameters
    ----------
    years : int or None
        Age in completed years.
    cap : int
        Ages at or above this are reported as ``f"{cap}+"``.

    Returns
    -------
    int, str or None
        None passes through.
    """
    if years is None:
        return None
    return f"{cap}+" if years >= cap else int(years)


def build_prompt(question: str, options: Sequence[str], n_images: int) -> str:
    """Human turn of a record: one ``<image>`` line per image, the question, one option per line.

    Parameters
    ----------
    question : str
        The question.
    options : sequence of str
        Answer options.
    n_images : int
        Number of images of the record.

    Returns
    -------
    str
        ``"<image>\\n" * n_images + question + "\\n" + "\\n".join(options)``.
    """
    return f"{IMAGE_TOKEN}\n" * n_images + question.strip() + "\n" + "\n".join(options)


def sanitize_name(text: str, default: str = DEFAULT_DATASET) -> str:
    """Folder-safe lowercase name: runs of other characters become ``_``.

    Parameters
    ----------
    text : str
        Any text, e.g. a folder name.
    default : str
        Returned when nothing usable remains.

    Returns
    -------
    str
        Matches ``[a-z0-9][a-z0-9_-]*``.
    """
    name = re.sub(r"[^a-z0-9_\-]+", "_", text.strip().lower()).strip("_-")
    return name or default


def _add_label_row(labels: dict[str, list[str]], key: str, value: str, path: Path, line: int) -> None:
    """Add one CSV row, rejecting empty keys/labels and conflicting duplicates."""
    parts = [part.strip() for part in value.split(LABEL_SEPARATOR) if part.strip()]
    if not key or not parts:
        raise ValueError(f"labels CSV {path} line {line} has an empty key or label; fill it in or delete the row")
    if key in labels and labels[key] != parts:
        raise ValueError(
            f"labels CSV {path} line {line}: key {key!r} already has labels {labels[key]}; keep one row per key"
        )
    labels[key] = parts


def _check_question(question: str) -> None:
    """Reject an empty question or one that already holds image tokens."""
    if not question or not question.strip():
        raise ValueError("question is empty; pass the question the model should answer about each image")
    if IMAGE_TOKEN in question:
        raise ValueError(f"question must not contain {IMAGE_TOKEN!r}; image tokens are added per record")


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, valid, test) fractions."""
    values = [float(f) for f in fractions]
    if len(values) != len(SPLITS) or min(values) < 0 or abs(sum(values) - 1.0) > SPLIT_TOLERANCE:
        raise ValueError(f"split fractions {tuple(fractions)} must be three non-negative numbers summing to 1")
    train, valid, test = values
    return train, valid, test


def _check_options(options: Sequence[str] | None, table: LabelTable) -> list[str]:
    """Default the options to the CSV's labels, or check that every label is an option."""
    if options is None:
        return table.all_labels()
    option_list = [str(option).strip() for option in options if str(option).strip()]
    missing = [label for label in table.all_labels() if label not in option_list]
    if missing:
        raise ValueError(f"labels {missing} are not among the options {option_list}; add them to the options")
    return option_list


def _resolve_salt(salt: bytes | str | None, salt_file: str | os.PathLike[str] | None, out_root: Path) -> bytes:
    """Return the salt from exactly one of ``salt`` / ``salt_file`` (kept outside ``out_root``)."""
    if (salt is None) == (salt_file is None):
        raise ValueError("give exactly one of salt= or salt_file= (a hospital secret kept outside the output folder)")
    if salt_file is not None:
        resolved = Path(salt_file).resolve()
        if resolved.is_relative_to(out_root.resolve()):
            raise ValueError(f"salt file {salt_file} lies inside the output folder {out_root}; keep it outside")
        return load_or_create_salt(resolved)
    key = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt or b"")
    if not key:
        raise ValueError("salt is empty; pass a secret of at least 16 random bytes")
    return key


def _scan(dicom_dir: Path, out_root: Path, summary: ConversionSummary) -> list[_Source]:
    """Read the header of every DICOM file under ``dicom_dir`` (skipping ``out_root``)."""
    out_resolved = out_root.resolve()
    sources = []
    for path in sorted(p for p in dicom_dir.rglob("*") if p.is_file()):
        if path.resolve().is_relative_to(out_resolved):
            continue
        summary.files_seen += 1
        rel = path.relative_to(dicom_dir).as_posix()
        if not is_dicom_file(path):
            _skip(summary.skipped_not_dicom, rel, "no DICM marker (not a DICOM Part 10 file)")
            continue
        try:
            ds = read_dicom(path, stop_before_pixels=True)
        except MediaError as exc:
            _skip(summary.skipped_not_dicom, rel, str(exc).replace(str(path), rel))
            continue
        sources.append(_source(path, rel, ds))
    return sources


def _skip(bucket: list[tuple[str, str]], rel: str, reason: str) -> None:
    """Record and log a skipped file."""
    logger.info("skipping %s: %s", rel, reason)
    bucket.append((rel, reason))


def _source(path: Path, rel: str, ds: Dataset) -> _Source:
    """Collect what the conversion needs from a header."""
    get = ds.get
    patient_id = str(get("PatientID", "") or "").strip()
    sop_uid = str(get("SOPInstanceUID", "") or "").strip()
    study_uid = str(get("StudyInstanceUID", "") or "").strip()
    years = parse_patient_age(get("PatientAge"))
    if years is None:
        years = age_from_dates(get("PatientBirthDate"), get("StudyDate"))
    sex = str(get("PatientSex", "") or "").strip().upper()
    return _Source(
        path=path,
        rel=rel,
        sop_uid=sop_uid or rel,
        study_uid=study_uid,
        patient_key=patient_id or (f"study:{study_uid}" if study_uid else f"instance:{sop_uid or rel}"),
        modality=str(get("Modality", "") or "").strip(),
        age=report_age(years),
        sex=sex if sex in SEXES else None,
        identifiers=_identifiers(ds),
    )


def _identifiers(ds: Dataset) -> tuple[str, ...]:
    """Identifying strings of a header (name components, IDs, birth date, accession number)."""
    get = ds.get
    values = [str(get(keyword, "") or "") for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber")]
    values += re.split(r"[\^=\s]+", str(get("PatientName", "") or ""))
    return tuple(v.strip() for v in values if len(v.strip()) >= MIN_IDENTIFIER_LENGTH)


def _check_name(kind: str, value: str | None) -> None:
    """Reject a folder name (modality / dataset) that is not lowercase letters, digits, '_' or '-'."""
    if value is not None and not NAME_PATTERN.match(value):
        raise ValueError(
            f"{kind} {value!r} must use lowercase letters, digits, '_' or '-', e.g. {sanitize_name(value)!r}"
        )


def _default_dataset_name(dicom_dir: Path, sources: list[_Source]) -> str:
    """The sanitised DICOM folder name, refused when it contains a patient identifier."""
    name = sanitize_name(dicom_dir.resolve().name)
    identifiers = {value.lower() for source in sources for value in source.identifiers}
    if any(value in name for value in identifiers):
        raise ValueError(
            f"the DICOM folder name {dicom_dir.name!r} contains patient identifiers and would become the dataset "
            "name; pass dataset=..."
        )
    return name


def _match_labels(
    sources: list[_Source], table: LabelTable, summary: ConversionSummary
) -> list[tuple[_Source, list[str]]]:
    """Pair each source with its labels; record unlabelled files and unmatched label keys."""
    find = _file_key_finder(sources, table) if table.key_column == "file" else _uid_key_finder(table)
    used: set[str] = set()
    labelled = []
    for source in sources:
        key = find(source)
        if key is None:
            logger.info("skipping %s: no label row", source.rel)
            summary.skipped_unlabelled.append(source.rel)
            continue
        used.add(key)
        labelled.append((source, table.labels[key]))
    summary.unmatched_labels = sorted(set(table.labels) - used)
    for key in summary.unmatched_labels:
        logger.warning("label row %s=%s matches no DICOM file", table.key_column, key)
    return labelled


def _uid_key_finder(table: LabelTable) -> Callable[[_Source], str | None]:
    """Lookup for SOPInstanceUID / StudyInstanceUID keys."""
    study = table.key_column == "StudyInstanceUID"

    def find(source: _Source) -> str | None:
        uid = source.study_uid if study else source.sop_uid
        return uid if uid in table.labels else None

    return find


def _file_key_finder(sources: list[_Source], table: LabelTable) -> Callable[[_Source], str | None]:
    """Lookup for ``file`` keys: a path relative to the DICOM folder, or a bare file name."""
    by_path: dict[str, str] = {}
    by_name: dict[str, str] = {}
    for key in table.labels:
        normalised = PurePosixPath(key.replace("\\", "/").removeprefix("./")).as_posix()
        (by_path if "/" in normalised else by_name)[normalised] = key
    name_counts: dict[str, int] = {}
    for source in sources:
        name = PurePosixPath(source.rel).name
        name_counts[name] = name_counts.get(name, 0) + 1
    ambiguous = sorted(name for name in by_name if name_counts.get(name, 0) > 1)
    if ambiguous:
        raise ValueError(
            f"label keys {ambiguous} each name several files; use paths relative to the DICOM folder"
        )

    def find(source: _Source) -> str | None:
        return by_path.get(source.rel) or by_name.get(PurePosixPath(source.rel).name)

    return find


def _convert(
    labelled: list[tuple[_Source, list[str]]], settings: _Settings, summary: ConversionSummary
) -> dict[str, dict[str, list[dict]]]:
    """Write the PNGs and build the records, grouped by folder and split."""
    records: dict[str, dict[str, list[dict]]] = {}
    patients: dict[str, set[str]] = {split: set() for split in SPLITS}
    for source, labels in labelled:
        folder = f"{settings.modality or sanitize_name(source.modality, UNKNOWN_MODALITY)}/{settings.dataset}"
        try:
            names = _write_frames(source, settings, settings.out_root / folder / "images")
        except MediaError as exc:
            _skip(summary.skipped_undecodable, source.rel, str(exc).replace(str(source.path), source.rel))
            continue
        patient = pseudonym(settings.salt, source.patient_key)
        split = assign_split(patient, settings.fractions)
        patients[split].add(patient)
        images = [f"{folder}/images/{name}" for name in names]
        record = _record(settings, labels, images, patient, source)
        records.setdefault(folder, {s: [] for s in SPLITS})[split].append(record)
    summary.patients = {split: len(ids) for split, ids in patients.items()}
    return records


def _write_frames(source: _Source, settings: _Settings, image_dir: Path) -> list[str]:
    """Decode the chosen frames of one instance and save them as PNG; return the file names."""
    ds = read_dicom(source.path)
    if settings.skip_burned_in and str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise MediaError(
            f"{source.rel} is flagged BurnedInAnnotation=YES (text in the pixels); "
            "pass skip_burned_in=False after review"
        )
    indices = uniform_indices(frame_count(ds), settings.n_frames)
    frames = dataset_frames(ds, indices, source=source.rel)
    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for index, frame in zip(indices, frames):
        name = image_stem(settings.salt, source.sop_uid, index) + ".png"
        _save_png(frame, image_dir / name)
        names.append(name)
    return names


def _save_png(frame: np.ndarray, path: Path) -> None:
    """Save a uint8 frame as PNG with no text, time or colour-profile chunks."""
    image = Image.fromarray(frame)
    image.info.clear()
    image.save(path, format="PNG")


def _record(settings: _Settings, labels: list[str], images: list[str], patient: str, source: _Source) -> dict:
    """One CLIMB record; only de-identified fields."""
    record: dict = {
        "conversations": [
            {"from": "human", "value": build_prompt(settings.question, settings.options, len(images))},
            {"from": "gpt", "value": ANSWER_SEPARATOR.join(labels)},
        ],
        "images": images,
        "dataset": settings.dataset,
        "patient_id": patient,
    }
    if source.age is not None:
        record["age"] = source.age
    if source.sex is not None:
        record["sex"] = source.sex
    return record


def _write_annotations(records: dict[str, dict[str, list[dict]]], out_root: Path, summary: ConversionSummary) -> None:
    """Write ``annotation_<split>.jsonl`` for every folder (empty splits give empty files)."""
    for folder, splits in sorted(records.items()):
        directory = out_root / folder
        directory.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in splits[split]]
            (directory / f"annotation_{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        summary.written[folder] = {split: len(splits[split]) for split in SPLITS}


def _prefixed(path: str, reason: str) -> str:
    """``reason``, prefixed with ``path`` unless it already starts with it."""
    return reason if reason.startswith(path) else f"{path}: {reason}"


def _parse_da(value: str | None) -> date | None:
    """A DICOM DA value as a date (None when absent or malformed)."""
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
