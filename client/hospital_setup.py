"""`fedclimb hospital init DIR`: a hospital folder ready for `fedclimb hospital start DIR`.

    DIR/hospital.yaml   this hospital's settings (common.config.HospitalConfig)
    DIR/node_key        its SuperNode key, OpenSSH ECDSA P-384, 0600: never leaves DIR
    DIR/NAME.pub        the public key: the one file to send to the coordinator
    DIR/ca.crt          a copy of the coordinator's CA certificate
    DIR/state/          privacy ledger, audit log, reply cache (or --state elsewhere)

The limits are the largest value each federation preset in configs/ uses (so a
federation run from the presets is never clamped) and the privacy budget lasts as many
rounds as the longest preset federation; ``approved_apps`` holds the digest of the
installed fedclimb's app. Nothing is overwritten without a flag: ``force`` makes a new
node key (and copies the CA certificate again) but keeps an existing hospital.yaml as it
is, hand edits included (approved_apps, privacy budget, limits); ``new_settings`` writes
a fresh hospital.yaml and keeps the old one as ``hospital.yaml.previous``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from client.hospital_checks import DataSummary, HospitalCheckError, check_data, load_checked
from common.config import (
    HospitalConfig,
    HospitalLimits,
    PrivacyConfig,
    config_dir,
    load_config,
)
from common.fab import installed_app_digest
from common.pki import KeyExistsError, new_node_keypair, split_address

__all__ = ["CA_FILE", "HOSPITAL_FILE", "NODE_KEY_FILE", "InitResult", "derive_limits", "hospital_yaml",
           "init_hospital", "preset_rounds"]

HOSPITAL_FILE = "hospital.yaml"
PREVIOUS_SUFFIX = ".previous"
NODE_KEY_FILE = "node_key"
CA_FILE = "ca.crt"
DEFAULT_STATE = "state"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class InitResult:
    """What init wrote and found."""

    config: Path
    public_key: Path | None
    digest: str
    data: DataSummary
    unit: str
    state_note: str = ""
    # hospital.yaml was kept as it was (force without new_settings).
    kept_settings: bool = False
    # Where the replaced hospital.yaml went (new_settings over an existing one).
    previous: Path | None = None
    # Whether hospital.yaml approves this installation's app (``digest``).
    approved: bool = True


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _preset_configs() -> list:
    return [load_config(None, [f"model={m}", f"federation={f}"])
            for m in _presets("model") for f in _presets("federation")]


def derive_limits() -> HospitalLimits:
    """Limits equal to the largest value any model x federation preset asks for."""
    cfgs = _preset_configs()

    def top(section: str, name: str) -> float:
        return max(getattr(getattr(c, section), name) for c in cfgs)

    base = HospitalLimits()
    return replace(
        base,
        max_local_steps=int(top("train", "steps")),
        max_rollouts=int(top("rollout", "num_rollouts")),
        max_batch_prompts=int(top("rollout", "batch_prompts")),
        max_new_tokens=int(top("rollout", "max_new_tokens")),
        max_lr=float(top("train", "lr")),
        max_ppo_epochs=int(top("train", "ppo_epochs")),
        max_temperature=float(top("rollout", "temperature")),
        # 0 (no KL term) is not a usable bound; the default then stands.
        max_kl_coef=float(top("train", "kl_coef")) or base.max_kl_coef,
    )


def preset_rounds() -> int:
    """The most rounds any preset federation runs (the default privacy.planned_rounds)."""
    return max(c.federation.rounds for c in _preset_configs())


def _delta_for(units: int) -> float:
    """1e-5, or a power of ten at most 1 / (10 N) for larger data sets."""
    if units < 10_000:
        return 1e-5
    return 10.0 ** -(math.ceil(math.log10(units)) + 1)


def _q(text: str) -> str:
    return json.dumps(text)  # a double-quoted YAML scalar


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def _lines(rows: list[tuple[str, str]]) -> str:
    """``key: value`` rows, their comments aligned in one column."""
    out = []
    for text, comment in rows:
        if text.startswith("#") or not comment:
            out.append(text)
        else:
            out.append(f"{text:<40} # {comment}")
    return "\n".join(out) + "\n"


def hospital_yaml(h: HospitalConfig) -> str:
    """hospital.yaml's text for ``h``, every setting with what it does."""
    p, lim = h.privacy, h.limits
    apps = [("approved_apps:", "")] + [(f"  - {_q(d)}", "") for d in h.approved_apps]
    if not h.approved_apps:
        apps = [("approved_apps: []", "`fedclimb hospital init` writes the installed app's \"sha256:<hex>\" here")]
    return _lines([
        ("# This hospital's own settings (schema: common.config.HospitalConfig), read by", ""),
        ("# `fedclimb hospital start` and by the ClientApp. The coordinator can never override them.", ""),
        ("# Relative paths are relative to this file.", ""),
        (f"name: {_q(h.name)}", "names the key file the coordinator admits (NAME.pub)"),
        (f"coordinator: {_q(h.coordinator)}", "the SuperLink's HOST:PORT"),
        (f"ca_cert: {_q(h.ca_cert)}", "the coordinator's CA certificate"),
        (f"node_key: {_q(h.node_key)}", "this hospital's private key (0600); it never leaves this folder"),
        (f"insecure: {str(h.insecure).lower()}", "true: no TLS, no node authentication (rehearsals only)"),
        ("# The app versions (FAB digests) this hospital runs. Any other app is refused before any of", ""),
        ("# its code runs, and the refusal names its digest (docs/app-pinning.md).", ""),
        *apps,
        (f"data_root: {_q(h.data_root)}", "CLIMB layout: <modality>/<dataset>/annotation_<split>.jsonl"),
        (f"state_dir: {_q(h.state_dir)}", "privacy ledger, audit log, reply cache: back it up, never delete it"),
        (f"device: {_q(h.device)}", "auto: cuda when present, else cpu"),
        (f"domain_key: {h.domain_key}", ""),
        (f"train_split: {_q(h.train_split)}", "the split trained on"),
        (f"eval_split: {_q(h.eval_split)}", "held-out split for evaluation; must differ from train_split"),
        (f"max_eval_records: {h.max_eval_records}", "0 = evaluate on the whole split"),
        ("privacy:", ""),
        (f"  enabled: {str(p.enabled).lower()}", ""),
        (f"  unit: {p.unit}", "patient: all of a patient's records are one privacy unit"),
        (f"  target_epsilon: {_num(p.target_epsilon)}", ""),
        (f"  delta: {p.delta:.1e}", "well below 1 / number of units"),
        (f"  planned_rounds: {p.planned_rounds}", "the budget lasts this many rounds, whatever the coordinator says"),
        (f"  planned_evaluations: {p.planned_evaluations}", "evaluations it also pays for (0 = planned_rounds + 1)"),
        (f"  noise_multiplier: {_num(p.noise_multiplier)}", "0 = calibrate from target_epsilon and planned_rounds"),
        (f"  max_grad_norm: {_num(p.max_grad_norm)}", ""),
        (f"  sample_rate: {_num(p.sample_rate)}", "0 = rollout.batch_prompts / N (N DP-released)"),
        (f"  accountant: {p.accountant}", ""),
        (f"  stats_release: {p.stats_release}", "per-domain unit counts, released once with DP noise"),
        (f"  stats_noise_multiplier: {_num(p.stats_noise_multiplier)}", ""),
        (f"  eval_release: {p.eval_release}", "held-out metrics: dp (noisy sums, charged), exact, none"),
        (f"  eval_noise_multiplier: {_num(p.eval_noise_multiplier)}", ""),
        (f"  domain_temperature: {p.domain_temperature}", ""),
        (f"  secure_rng: {str(p.secure_rng).lower()}", "keep true outside simulations"),
        ("# What the coordinator may ask per round: the largest value any federation preset in configs/", ""),
        ("# uses (a preset federation is never clamped). A larger request is clamped to the limit, and", ""),
        ("# `fedclimb hospital start` prints each clamp.", ""),
        ("limits:", ""),
        (f"  max_local_steps: {lim.max_local_steps}", ""),
        (f"  max_rollouts: {lim.max_rollouts}", ""),
        (f"  max_batch_prompts: {lim.max_batch_prompts}", ""),
        (f"  max_new_tokens: {lim.max_new_tokens}", ""),
        (f"  max_lr: {_num(lim.max_lr)}", ""),
        (f"  max_ppo_epochs: {lim.max_ppo_epochs}", ""),
        (f"  max_temperature: {_num(lim.max_temperature)}", ""),
        (f"  max_kl_coef: {_num(lim.max_kl_coef)}", ""),
        (f"  max_evaluations_per_round: {lim.max_evaluations_per_round}", "each answered evaluation releases metrics"),
        (f"  max_evaluations_per_run: {lim.max_evaluations_per_run}", "per Flower run"),
        (f"  max_evaluations_total: {lim.max_evaluations_total}", "over the life of state_dir"),
    ])


def _check_inputs(root: Path, name: str, coordinator: str, ca: Path | None, insecure: bool) -> None:
    if not _NAME.fullmatch(name):
        raise HospitalCheckError(f"--name {name!r}: a hospital name is 1-64 letters, digits, '.', '_' or '-' "
                                 "(it names the key file the coordinator admits)")
    try:
        split_address(coordinator)
    except ValueError as exc:
        raise HospitalCheckError(f"--coordinator: {exc}") from None
    if not insecure and (ca is None or not ca.is_file()):
        raise HospitalCheckError(f"--ca {ca}: not a file; use the ca.crt the coordinator sent "
                                 "(its DIR/pki/ca.crt)")
    if root.exists() and not root.is_dir():
        raise HospitalCheckError(f"{root} exists and is not a folder")


def _refuse_existing(root: Path, name: str, force: bool, new_settings: bool) -> None:
    key_files = [p for p in (root / NODE_KEY_FILE, root / f"{name}.pub") if p.exists()]
    existing = ([root / HOSPITAL_FILE] if (root / HOSPITAL_FILE).exists() else []) + key_files
    if existing and not (force or new_settings):
        raise HospitalCheckError(
            f"{', '.join(map(str, existing))} exist(s); nothing was changed. `--force` makes a new node key (the "
            "coordinator must admit the new public key again) and keeps hospital.yaml as it is; `--new-settings` "
            f"writes a fresh hospital.yaml (the current one is kept as {HOSPITAL_FILE}{PREVIOUS_SUFFIX}). The state "
            "folder and its ledger are always kept")


def _check_kept(kept: HospitalConfig, path: Path, *, name: str, coordinator: str, data: Path, insecure: bool,
                state: str | None) -> None:
    """The kept hospital.yaml must say what the command line says; else nothing is written."""
    differ = []
    for key, have, want in (("name", kept.name, name), ("coordinator", kept.coordinator, coordinator),
                            ("insecure", kept.insecure, insecure)):
        if have != want:
            differ.append(f"{key} is {have!r} there, {want!r} on the command line")
    if Path(kept.data_root).resolve() != data.resolve():
        differ.append(f"data_root is {kept.data_root!r} there, {str(data)!r} on the command line")
    if state is not None and Path(kept.state_dir).resolve() != (path.parent / state).resolve():
        differ.append(f"state_dir is {kept.state_dir!r} there, {state!r} on the command line")
    if differ:
        raise HospitalCheckError(
            f"{path} is kept as it is with --force, but " + "; ".join(differ) + ". Nothing was changed: edit "
            f"{path}, or add --new-settings to write a fresh one (the current one is kept as "
            f"{path.name}{PREVIOUS_SUFFIX})")


def init_hospital(root: Path, *, coordinator: str, ca: Path | None, data: Path, name: str | None = None,
                  state: str | None = None, insecure: bool = False, force: bool = False,
                  new_settings: bool = False) -> InitResult:
    """Create the hospital folder ``root`` (see the module docstring)."""
    root = Path(root).absolute()
    name = name or root.name
    _check_inputs(root, name, coordinator, ca, insecure)
    _refuse_existing(root, name, force, new_settings)
    path = root / HOSPITAL_FILE
    keep = path.exists() and not new_settings
    if keep:
        _check_kept(load_checked(path), path, name=name, coordinator=coordinator, data=Path(data).absolute(),
                    insecure=insecure, state=state)
    base = HospitalConfig(name=name, data_root=str(Path(data).absolute()), state_dir=DEFAULT_STATE)
    probe = replace(base, privacy=replace(PrivacyConfig(), unit="record", planned_rounds=1))
    summary = check_data(probe)
    unit = "patient" if summary.all_have_patient_ids and not summary.patients_in_both else "record"
    privacy = replace(PrivacyConfig(), unit=unit, planned_rounds=preset_rounds(),
                      delta=_delta_for(summary.train_records))
    digest = installed_app_digest()
    h = replace(base, coordinator=coordinator, insecure=insecure, privacy=privacy, limits=derive_limits(),
                state_dir=state or DEFAULT_STATE, approved_apps=[digest],
                ca_cert="" if insecure else CA_FILE, node_key="" if insecure else NODE_KEY_FILE)
    root.mkdir(parents=True, exist_ok=True)
    public = None
    if not insecure:
        assert ca is not None
        if ca.resolve() != (root / CA_FILE).resolve():
            shutil.copyfile(ca, root / CA_FILE)
        public = root / f"{name}.pub"
        if force or not ((root / NODE_KEY_FILE).exists() and public.exists()):
            try:
                new_node_keypair(root / NODE_KEY_FILE, public, comment=f"fedclimb hospital {name}", force=force)
            except KeyExistsError as exc:
                raise HospitalCheckError(str(exc)) from None
    previous = None
    if not keep:
        if path.exists():
            previous = path.with_name(path.name + PREVIOUS_SUFFIX)
            shutil.copyfile(path, previous)
        path.write_text(hospital_yaml(h), encoding="utf-8")
    written = load_checked(path)
    note = ""
    try:
        Path(written.state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        note = f"state folder {written.state_dir} not created here ({exc.strerror}); it must exist where the hospital runs"
    return InitResult(path, public, digest, summary, written.privacy.unit, note, kept_settings=keep,
                      previous=previous, approved=digest in written.approved_apps)
