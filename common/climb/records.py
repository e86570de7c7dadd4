"""CLIMB records: parsing the JSONL annotation files into a typed :class:`Record`.

Layout: ``<root>/<modality>/<dataset>/annotation_{train,valid,test}.jsonl``. Each line is
either LLaVA-style (``conversations`` with a human and a gpt turn) or QoQ-Med's flat
variant (``problem`` / ``answer``). Media paths are relative to ``root`` and must stay
inside it (or inside a folder named in ``<root>/linked_roots.txt``); media are only
referenced here and loaded lazily by :mod:`common.climb.inputs`.

Lines are read as bytes with a length limit, decoded and parsed one at a time: a bad
line (too long, not UTF-8, not JSON, nested too deeply, an integer too long) costs that
line only and is reported with its number.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from common.climb.errors import MediaError, RecordError
from common.climb.limits import DEFAULT_BOUNDS, Bounds, is_inside, outside_root_message, resolved

log = logging.getLogger(__name__)

__all__ = [
    "Record",
    "SPLITS",
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "annotation_files",
    "parse_record",
    "iter_records",
    "load_records",
    "linked_roots",
    "read_lines",
    "parse_json_line",
    "LINKED_ROOTS_FILE",
    "split_options",
    "split_answer",
]

SPLITS = ("train", "valid", "test")
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
ECG_TOKEN = "<ecg>"
_ANNOTATION = re.compile(r"annotation_(?P<split>[A-Za-z0-9]+)\.jsonl$")
Box = tuple[float, float, float, float]
LINKED_ROOTS_FILE = "linked_roots.txt"
# Reading past an over-long line happens in pieces of this size (bounded memory).
_SKIP_CHUNK = 1 << 16


@dataclass(frozen=True)
class Record:
    """One CLIMB question with its answer and media references.

    ``id`` is ``"<file relative to root>:<line>"``; it is stable and names the place to
    fix when the record is wrong.
    """

    id: str
    root: str
    file: str
    line: int
    split: str
    modality: str
    dataset: str
    domain: str
    prompt: str
    question: str
    options: tuple[str, ...]
    answers: tuple[str, ...]
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    time_series: tuple[str, ...] = ()
    bboxes: tuple[Box, ...] = ()
    segmentation: str | None = None
    patient_id: str | None = None
    demographics: Mapping[str, Any] = field(default_factory=dict)
    # Folders besides ``root`` that media may resolve into (linked_roots.txt).
    linked_roots: tuple[str, ...] = ()

    @property
    def answer_text(self) -> str:
        """The answer as CLIMB writes it (multi-label joined with ", ")."""
        return ", ".join(self.answers)

    @property
    def has_localisation(self) -> bool:
        return bool(self.bboxes) or self.segmentation is not None

    @property
    def roots(self) -> tuple[str, ...]:
        """The data root and its linked roots: every media file must resolve inside one."""
        return (self.root, *self.linked_roots)

    def media_path(self, rel: str) -> Path:
        """``root / rel``, once checked to resolve inside :attr:`roots`.

        Raises
        ------
        MediaError
            The path is absolute, has ``..`` or resolves (through symbolic links)
            outside every root; the message is the same whether or not it exists.
        """
        check_relative(rel)
        path = Path(self.root) / rel
        if not is_inside(resolved(path), [Path(r).resolve() for r in self.roots]):
            raise MediaError(outside_root_message(rel))
        return path


def check_relative(rel: str) -> None:
    """Refuse an absolute media path or one with a ``..`` component (before any file access)."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if (
        not rel
        or "\0" in rel
        or PurePosixPath(rel).is_absolute()
        or PureWindowsPath(rel).drive
        or PureWindowsPath(rel).is_absolute()
        or ".." in parts
    ):
        raise MediaError(outside_root_message(rel))


def linked_roots(root: str | Path, *, bounds: Bounds = DEFAULT_BOUNDS) -> tuple[str, ...]:
    """The folders named in ``<root>/linked_roots.txt`` (one absolute path a line), resolved.

    The allow-list of a root whose media live elsewhere: a simulated hospital links the
    media of the root it was partitioned from, the pooled data of ``simulate --compare``
    those of every hospital. Lines that are blank or start with ``#`` are ignored; a line
    that is not an absolute path to an existing folder is logged and ignored.
    """
    path = Path(root) / LINKED_ROOTS_FILE
    if not path.exists():
        return ()
    try:
        bounds.within([root]).file(path, "linked-roots list", max_bytes=bounds.max_line_bytes)
        text = path.read_text(encoding="utf-8")
    except (MediaError, OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return ()
    out = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        folder = Path(entry)
        if not folder.is_absolute() or not folder.is_dir():
            log.warning("%s: ignoring %r (not an absolute path to a folder)", path, entry)
            continue
        out.append(str(folder.resolve()))
    return tuple(out)


def annotation_files(root: str | Path) -> list[tuple[Path, str]]:
    """Every ``annotation_<split>.jsonl`` under ``root`` with its split, sorted."""
    root = Path(root)
    found = []
    for path in sorted(root.rglob("annotation_*.jsonl")):
        m = _ANNOTATION.search(path.name)
        if m:
            found.append((path, m.group("split")))
    return found


def split_options(prompt: str) -> tuple[str, tuple[str, ...]]:
    """Split a human turn into (question, options).

    Options are the non-empty lines after the last line that ends with ``:`` (CLIMB
    writes "... Answer with one phrase from the following:" then one option per line).
    Media placeholder tokens are removed from the question. No such line means a
    free-form question without options.
    """
    text = prompt.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "").replace(ECG_TOKEN, "")
    lines = [ln.rstrip() for ln in text.strip().splitlines()]
    cut = max((i for i, ln in enumerate(lines) if ln.strip().endswith(":")), default=None)
    if cut is None:
        return "\n".join(ln for ln in lines if ln.strip()), ()
    options = tuple(ln.strip() for ln in lines[cut + 1 :] if ln.strip())
    question = "\n".join(ln for ln in lines[: cut + 1] if ln.strip())
    return question, options


def split_answer(answer: str, options: tuple[str, ...]) -> tuple[str, ...]:
    """Answer labels: the whole answer if it is an option, else its ", "-joined parts."""
    answer = answer.strip()
    if not options or answer in options:
        return (answer,) if answer else ()
    return tuple(a.strip() for a in answer.split(", ") if a.strip())


def _str_list(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise RecordError(f"field '{key}' must be a list of paths (strings), got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise RecordError(f"field '{key}' must be a list of paths (strings), got an entry {bad[0]!r}")
    for rel in value:
        check_relative(rel)
    return tuple(value)


def _boxes(value: Any) -> tuple[Box, ...]:
    if value is None or value == []:
        return ()

    def one(b: Any) -> Box:
        if (
            not isinstance(b, list | tuple)
            or len(b) != 4
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in b)
        ):
            raise RecordError(f"field 'bbox' must be [x1, y1, x2, y2] or a list of them, got {b!r}")
        x1, y1, x2, y2 = (float(x) for x in b)
        if not all(math.isfinite(x) for x in (x1, y1, x2, y2)):
            raise RecordError(f"bbox {list(b)} has a coordinate that is not a finite number")
        if x2 <= x1 or y2 <= y1:
            raise RecordError(f"bbox {list(b)} has x2 <= x1 or y2 <= y1")
        return (x1, y1, x2, y2)

    if isinstance(value, list) and value and all(isinstance(x, list | tuple) for x in value):
        return tuple(one(b) for b in value)
    return (one(value),)


def _turns(obj: Mapping[str, Any]) -> tuple[str, str]:
    if "conversations" in obj:
        conv = obj["conversations"]
        if not isinstance(conv, list) or len(conv) < 2:
            raise RecordError("field 'conversations' must be a list with a human and a gpt turn")
        human = next((t for t in conv if isinstance(t, dict) and t.get("from") == "human"), None)
        gpt = next((t for t in conv if isinstance(t, dict) and t.get("from") == "gpt"), None)
        if human is None or gpt is None:
            raise RecordError("'conversations' needs one turn from 'human' and one from 'gpt'")
        prompt, answer = human.get("value"), gpt.get("value")
    elif "problem" in obj:
        prompt, answer = obj.get("problem"), obj.get("answer")
    else:
        raise RecordError("record has neither 'conversations' nor 'problem'/'answer'")
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise RecordError("the question and the answer must be strings")
    return prompt, answer


def parse_record(
    obj: Any,
    *,
    root: str | Path,
    file: str,
    line: int,
    split: str,
    domain_key: Literal["dataset", "modality"] = "dataset",
    linked: tuple[str, ...] = (),
) -> Record:
    """Build a :class:`Record` from one decoded JSON line; structural checks only.

    ``linked`` are the root's linked roots (:func:`linked_roots`).

    Raises
    ------
    RecordError
        One line saying what is wrong with the record (media are not opened here).
    """
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object, got {type(obj).__name__}")
    prompt, answer = _turns(obj)
    if not answer.strip():
        raise RecordError("empty answer")
    images, videos = _str_list(obj, "images"), _str_list(obj, "videos")
    series = _str_list(obj, "time-series") or _str_list(obj, "time_series")
    n_img, n_vid = prompt.count(IMAGE_TOKEN), prompt.count(VIDEO_TOKEN)
    if n_img != len(images):
        raise RecordError(f"{n_img} {IMAGE_TOKEN} token(s) in the question but {len(images)} image path(s)")
    if n_vid != len(videos):
        raise RecordError(f"{n_vid} {VIDEO_TOKEN} token(s) in the question but {len(videos)} video path(s)")
    question, options = split_options(prompt)
    answers = split_answer(answer, options)
    missing = [a for a in answers if options and a not in options]
    if missing:
        raise RecordError(f"answer {missing[0]!r} is not among the options {list(options)}")

    parts = Path(file).parts
    modality = parts[0] if len(parts) >= 3 else "unknown"
    dataset = obj.get("dataset") if isinstance(obj.get("dataset"), str) and obj.get("dataset") else None
    dataset = dataset or (parts[1] if len(parts) >= 3 else Path(file).parent.name or "unknown")
    seg = obj.get("segmentation_path")
    if seg is not None and not isinstance(seg, str):
        raise RecordError("field 'segmentation_path' must be a string path")
    if seg is not None:
        check_relative(seg)
    pid = obj.get("patient_id")
    if pid is not None and not isinstance(pid, str | int):
        raise RecordError("field 'patient_id' must be a string or an integer")
    demo = {k: obj[k] for k in ("age", "sex", "race", "demo") if k in obj}
    return Record(
        id=f"{file}:{line}",
        root=str(root),
        file=file,
        line=line,
        split=split,
        modality=modality,
        dataset=dataset,
        domain=dataset if domain_key == "dataset" else modality,
        prompt=prompt,
        question=question,
        options=options,
        answers=answers,
        images=images,
        videos=videos,
        time_series=series,
        bboxes=_boxes(obj.get("bbox")),
        segmentation=seg,
        patient_id=None if pid is None else str(pid),
        demographics=demo,
        linked_roots=linked,
    )


@dataclass(frozen=True)
class Problem:
    """An invalid line: where it is and why."""

    file: str
    line: int
    reason: str


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_line(raw: bytes, *, first: bool = False) -> Any:
    """Decode one annotation line (UTF-8; a BOM on the first line is allowed) and parse it.

    Raises
    ------
    RecordError
        Not UTF-8, not JSON, ``NaN``/``Infinity``, nested too deeply or an integer
        too long to convert; the reason says which.
    """
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"line is not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RecordError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise RecordError("not usable JSON (nested too deeply)") from None
    except ValueError as exc:  # NaN/Infinity, or an integer longer than Python converts
        raise RecordError(f"not usable JSON ({' '.join(str(exc).split())})") from None


def read_lines(path: Path, *, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line number, raw line)`` of a file; ``None`` for a line over ``max_line_bytes``.

    Memory stays bounded: an over-long line is skipped in pieces, never held whole.
    """
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(max_line_bytes + 2)  # room for the line's own "\r\n"
            if not raw:
                return
            number += 1
            if len(raw.rstrip(b"\r\n")) > max_line_bytes:
                while not raw.endswith(b"\n"):  # the rest of the line, piece by piece
                    raw = handle.readline(_SKIP_CHUNK)
                    if not raw:
                        break
                yield number, None
                continue
            yield number, raw


def _annotation_problem(path: Path, root: Path, rel: str) -> str | None:
    """Why an annotation file may not be read (outside the root, not a regular file), or None."""
    try:
        DEFAULT_BOUNDS.within([root]).file(root / rel, "annotation file", max_bytes=1 << 62)
    except MediaError as exc:
        return str(exc).replace(str(root / rel), rel)
    return None


def iter_records(
    root: str | Path,
    *,
    splits: tuple[str, ...] | None = None,
    domain_key: Literal["dataset", "modality"] = "dataset",
    max_line_bytes: int = DEFAULT_BOUNDS.max_line_bytes,
) -> Iterator[Record | Problem]:
    """Yield every record under ``root``, or a :class:`Problem` for a line that fails.

    Never raises on bad content: a line longer than ``max_line_bytes``, not UTF-8 or not
    JSON is a Problem with its line number and the lines after it are still read.
    """
    root = Path(root)
    linked = linked_roots(root)
    for path, split in annotation_files(root):
        if splits is not None and split not in splits:
            continue
        rel = path.relative_to(root).as_posix()
        refused = _annotation_problem(path, root, rel)
        if refused:
            yield Problem(rel, 0, refused)
            continue
        try:
            for number, raw in read_lines(path, max_line_bytes=max_line_bytes):
                if raw is None:
                    yield Problem(rel, number, f"line is longer than data.max_line_bytes={max_line_bytes} bytes")
                    continue
                if not raw.strip():
                    continue
                try:
                    obj = parse_json_line(raw, first=number == 1)
                    yield parse_record(obj, root=root, file=rel, line=number, split=split, domain_key=domain_key,
                                       linked=linked)
                except RecordError as exc:
                    yield Problem(rel, number, str(exc))
                except RecursionError:
                    yield Problem(rel, number, "not usable JSON (nested too deeply)")
        except OSError as exc:
            yield Problem(rel, 0, f"cannot read annotation file: {exc.strerror or exc}")


def load_records(
    root: str | Path,
    split: str,
    *,
    domain_key: Literal["dataset", "modality"] = "dataset",
    max_records: int = 0,
    max_line_bytes: int = DEFAULT_BOUNDS.max_line_bytes,
) -> list[Record]:
    """The valid records of one split (invalid lines are logged and skipped).

    ``max_records`` > 0 keeps that many, evenly spaced over the split's files (so a cap
    for a smoke run still samples every file rather than the first one only).
    """
    out: list[Record] = []
    skipped = 0
    for item in iter_records(root, splits=(split,), domain_key=domain_key, max_line_bytes=max_line_bytes):
        if isinstance(item, Problem):
            skipped += 1
            log.warning("skipping %s:%d: %s", item.file, item.line, item.reason)
            continue
        out.append(item)
    if skipped:
        log.warning("%d invalid record(s) skipped in split %r under %s; run `fedclimb data validate`", skipped, split, root)
    if not max_records or len(out) <= max_records:
        return out
    step = len(out) / max_records
    return [out[int(i * step)] for i in range(max_records)]
