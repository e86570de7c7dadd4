"""What `fedclimb hospital init` and `start` check before anything runs, each with a reason to act on.

- :func:`check_data`: the data root as ``fedclimb data validate`` checks it (every line
  parsed, every medium decoded within the default ``data.*`` limits), a non-empty
  training split, and under patient-level DP a patient id on every record and no
  patient in both splits.
- :func:`check_ledger`: the privacy ledger opens and verifies (hash chain, high-water
  mark, delta and accountant unchanged); a ledger missing beside other privacy state is
  refused (common/privacy/ledger.py). A fresh state folder gets an empty ledger.
- :func:`check_identity`: the coordinator address, its CA certificate and this
  hospital's node key (readable by its owner only) unless the hospital runs insecure.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.climb.limits import bounds_for
from common.climb.records import Problem, annotation_files, iter_records
from common.climb.validate import validate_root
from common.config import ConfigError, DataConfig, HospitalConfig, load_hospital_config
from common.pki import split_address
from common.privacy.ledger import LedgerError, PrivacyLedger

__all__ = ["DataSummary", "HospitalCheckError", "check_data", "check_identity", "check_ledger", "load_checked"]

#: Invalid records named in an error (``fedclimb data validate ROOT`` lists them all).
_SHOWN_PROBLEMS = 3


class HospitalCheckError(RuntimeError):
    """A hospital's settings, data, keys or ledger cannot be used; the message says what to do."""


@dataclass
class DataSummary:
    """Valid records per split and domain, and whether every record names its patient."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    all_have_patient_ids: bool = False
    patients_in_both: int = 0
    train_records: int = 0
    eval_records: int = 0

    def lines(self) -> list[str]:
        out = []
        for split in sorted(self.counts):
            domains = ", ".join(f"{d} {n}" for d, n in sorted(self.counts[split].items()))
            out.append(f"{split}: {sum(self.counts[split].values())} records ({domains})")
        return out


def load_checked(path: Path) -> HospitalConfig:
    """hospital.yaml, read and checked like the ClientApp reads it."""
    if not path.is_file():
        raise HospitalCheckError(f"{path} not found: run `fedclimb hospital init` first, or name the folder "
                                 "that holds hospital.yaml")
    try:
        return load_hospital_config(path)
    except ConfigError as exc:
        raise HospitalCheckError(f"{path}: {exc}") from None


def _patients(h: HospitalConfig, limits: DataConfig) -> tuple[bool, int]:
    """(every train/eval record has a patient_id, number of patients in both splits)."""
    ids: dict[str, set[str]] = {h.train_split: set(), h.eval_split: set()}
    missing = 0
    for item in iter_records(h.data_root, splits=(h.train_split, h.eval_split), domain_key=h.domain_key,
                             max_line_bytes=limits.max_line_bytes):
        if isinstance(item, Problem):
            continue
        if item.patient_id is None:
            missing += 1
        else:
            ids[item.split].add(item.patient_id)
    return missing == 0, len(ids[h.train_split] & ids[h.eval_split])


def check_data(h: HospitalConfig) -> DataSummary:
    """Validate the hospital's data root (see the module docstring); returns what it holds."""
    root = Path(h.data_root)
    if not h.data_root or not root.is_dir():
        raise HospitalCheckError(f"data root {root} is not a folder; set data_root in hospital.yaml (or --data)")
    if not annotation_files(root):
        raise HospitalCheckError(f"no annotation_<split>.jsonl files under {root} (expected "
                                 "<modality>/<dataset>/annotation_train.jsonl; see docs/data.md)")
    limits = DataConfig()
    report = validate_root(root, domain_key=h.domain_key, media=True, bounds=bounds_for(limits),
                           max_images=limits.max_images)
    if report.invalid:
        shown = "; ".join(f"{p.file}:{p.line}: {p.reason}" for p in report.invalid[:_SHOWN_PROBLEMS])
        raise HospitalCheckError(
            f"{len(report.invalid)} invalid record(s) under {root} ({shown}); `fedclimb data validate {root}` "
            "lists them all: fix or remove them")
    summary = DataSummary(counts=report.counts)
    summary.train_records = sum(report.counts.get(h.train_split, {}).values())
    summary.eval_records = sum(report.counts.get(h.eval_split, {}).values())
    if not summary.train_records:
        raise HospitalCheckError(f"no records in the training split {h.train_split!r} under {root} "
                                 f"(annotation_{h.train_split}.jsonl); check train_split in hospital.yaml")
    summary.all_have_patient_ids, summary.patients_in_both = _patients(h, limits)
    if h.privacy.enabled and h.privacy.unit == "patient":
        if not summary.all_have_patient_ids:
            raise HospitalCheckError("privacy.unit is patient but some records have no patient_id: add it to every "
                                     "record, or set privacy.unit: record in hospital.yaml")
        if summary.patients_in_both:
            raise HospitalCheckError(f"{summary.patients_in_both} patient(s) have records in both {h.train_split!r} and "
                                     f"{h.eval_split!r}: split the data by patient")
    return summary


def check_ledger(h: HospitalConfig) -> PrivacyLedger | None:
    """Open and verify the privacy ledger in the state folder (created there when fresh)."""
    state = Path(h.state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HospitalCheckError(f"cannot create the state folder {state}: {exc}") from None
    if not os.access(state, os.W_OK):
        raise HospitalCheckError(f"the state folder {state} is not writable by this user (uid {os.getuid()})")
    if not h.privacy.enabled:
        return None
    p = h.privacy
    try:
        return PrivacyLedger.open(state, delta=p.delta, target_epsilon=p.target_epsilon, accountant=p.accountant)
    except LedgerError as exc:
        raise HospitalCheckError(f"privacy ledger: {exc}") from None


def _private_key(path: Path) -> None:
    if not path.is_file():
        raise HospitalCheckError(f"node key {path} not found; `fedclimb hospital init --force` makes a new one "
                                 "(then send the new public key to the coordinator)")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise HospitalCheckError(f"node key {path} is readable by other users; run: chmod 600 {path}")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise HospitalCheckError(f"node key {path} is not an unencrypted OpenSSH private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HospitalCheckError(f"node key {path} is not an ECDSA key (Flower needs ECDSA on a NIST curve)")


def check_identity(h: HospitalConfig, *, insecure: bool) -> None:
    """The coordinator address, and unless ``insecure`` its CA certificate and the node key."""
    try:
        split_address(h.coordinator)
    except ValueError as exc:
        raise HospitalCheckError(f"coordinator in hospital.yaml: {exc}") from None
    if insecure:
        return
    ca = Path(h.ca_cert)
    if not h.ca_cert or not ca.is_file():
        raise HospitalCheckError(f"CA certificate {ca} not found; copy the coordinator's ca.crt there "
                                 "(ca_cert in hospital.yaml)")
    try:
        x509.load_pem_x509_certificate(ca.read_bytes())
    except ValueError as exc:
        raise HospitalCheckError(f"{ca} is not a PEM certificate: {exc}") from None
    if not h.node_key:
        raise HospitalCheckError("node_key is not set in hospital.yaml")
    _private_key(Path(h.node_key))

