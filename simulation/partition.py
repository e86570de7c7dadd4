"""Split a real CLIMB root into simulated hospitals.

Modes (``simulation.partition``):

- ``folders``: ROOT already holds one CLIMB root per hospital (``ROOT/<name>/<modality>/...``);
  hospital i is the i-th folder in sorted order.
- ``domain``: domain skew. Domain j (sorted) goes to hospital ``j mod N`` with probability
  ``DOMAIN_SHARE`` and to a uniformly random other hospital otherwise.
- ``dirichlet``: label skew. For each (domain, label) group, hospital shares are drawn from
  Dirichlet(alpha, ..., alpha) and the group's records are dealt out with those shares.
  Smaller alpha = more skew.

Every split is partitioned with the same per-group shares, so each hospital keeps its own
held-out data. Records are copied verbatim (one JSONL line each); media are not copied:
every other file or folder beside an annotation file is a symbolic link to the original,
and each hospital root names the original root in its ``linked_roots.txt`` (the explicit
allow-list without which the data-root boundary refuses the links; see
:func:`common.climb.records.linked_roots`).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np

from common.climb.errors import RecordError
from common.climb.limits import DEFAULT_BOUNDS
from common.climb.records import (
    LINKED_ROOTS_FILE,
    annotation_files,
    linked_roots,
    parse_json_line,
    parse_record,
    read_lines,
)

log = logging.getLogger(__name__)

__all__ = ["partition_root", "DOMAIN_SHARE"]

DOMAIN_SHARE = 0.8


def _hospital_folders(root: Path, hospitals: int) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and annotation_files(p))
    depths = {len(p.relative_to(root).parts) for p, _ in annotation_files(root)}
    if not folders or min(depths) < 4:  # ROOT/<hospital>/<modality>/<dataset>/annotation_*.jsonl
        raise ValueError(
            f"{root} does not hold one CLIMB root per hospital; use simulation.partition=domain or dirichlet"
        )
    if len(folders) != hospitals:
        raise ValueError(
            f"{root} holds {len(folders)} hospital folders ({', '.join(p.name for p in folders)}) "
            f"but {hospitals} hospitals were asked for; pass --hospitals {len(folders)}"
        )
    return folders


def _mirror(src: Path, dst: Path, keep: set[Path]) -> None:
    """Recreate the folders that lead to annotation files; link everything else."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and any(k == entry or entry in k.parents for k in keep):
            _mirror(entry, target, keep)
        elif entry.name.startswith("annotation_") and entry.suffix == ".jsonl":
            continue
        elif entry.name == LINKED_ROOTS_FILE:  # written, never linked (a write would land in the source)
            continue
        elif not target.exists():
            os.symlink(entry.resolve(), target)


def partition_root(
    root: Path,
    out: Path,
    *,
    hospitals: int,
    mode: Literal["folders", "domain", "dirichlet"],
    alpha: float = 0.5,
    seed: int = 0,
    domain_key: Literal["dataset", "modality"] = "dataset",
    max_line_bytes: int = DEFAULT_BOUNDS.max_line_bytes,
) -> list[Path]:
    """Write ``out/hospital-<i>`` CLIMB roots (or return ROOT's folders) and return them.

    ``max_line_bytes`` is ``data.max_line_bytes``: the lines the hospitals will accept.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"--data {root} is not a directory")
    if mode == "folders":
        return _hospital_folders(root, hospitals)
    files = annotation_files(root)
    if not files:
        raise ValueError(f"no annotation_<split>.jsonl under {root}")
    rng = np.random.default_rng(seed)
    # (file, line text, domain, label) of every parsable record.
    items: list[tuple[Path, str, str, str]] = []
    for path, split in files:
        rel = path.relative_to(root).as_posix()
        for number, raw in read_lines(path, max_line_bytes=max_line_bytes):
            if raw is not None and not raw.strip():
                continue
            try:
                if raw is None:
                    raise RecordError("line too long")
                obj = parse_json_line(raw, first=number == 1)
                rec = parse_record(obj, root=root, file=rel, line=number, split=split, domain_key=domain_key)
            except RecordError:
                log.warning("partition: skipping %s:%d (invalid; see `fedclimb data validate`)", rel, number)
                continue
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            items.append((path, text, rec.domain, rec.answer_text))
    domains = sorted({d for _, _, d, _ in items})
    groups = sorted({(d, lab) for _, _, d, lab in items})
    shares: dict[tuple[str, str], np.ndarray] = {}
    for d, lab in groups:
        if mode == "domain":
            home = domains.index(d) % hospitals
            p = np.full(hospitals, (1 - DOMAIN_SHARE) / max(hospitals - 1, 1))
            p[home] = DOMAIN_SHARE if hospitals > 1 else 1.0
        else:
            p = rng.dirichlet(np.full(hospitals, alpha))
        shares[(d, lab)] = p
    assigned: dict[tuple[int, Path], list[str]] = defaultdict(list)
    for path, text, d, lab in items:
        h = int(rng.choice(hospitals, p=shares[(d, lab)]))
        assigned[(h, path)].append(text)
    keep = {p.parent for p, _ in files}
    allowed = "".join(f"{r}\n" for r in (str(root), *linked_roots(root)))
    roots = []
    for h in range(hospitals):
        dst_root = out / f"hospital-{h}"
        _mirror(root, dst_root, keep)
        (dst_root / LINKED_ROOTS_FILE).write_text(allowed, encoding="utf-8")
        for path, _ in files:
            lines = assigned.get((h, path), [])
            target = dst_root / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(t + "\n" for t in lines), encoding="utf-8")
        roots.append(dst_root)
    return roots
