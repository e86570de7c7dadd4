"""The `fedclimb` command line.

    fedclimb simulate [options] [key=value ...]      the whole federation on one machine
    fedclimb train-local --data ROOT --steps N        one hospital's local DRPO, no Flower
    fedclimb data validate ROOT [--json]              check a CLIMB root, media included
    fedclimb data synth OUT                           write the synthetic federation
    fedclimb data synth OUT --graded 40,25,15,8,2     write the learning benchmark's graded-rarity pool
    fedclimb data from-dicom DICOM_DIR OUT ...        a hospital's DICOM folder -> CLIMB
    fedclimb data from-table OUT --csv F|--builtin    a table (one row per patient) -> CLIMB text records
    fedclimb privacy report --state DIR               a hospital's privacy ledger, verified
    fedclimb privacy seal --state DIR                 adopt a version-1 ledger or one without a mark
    fedclimb export --adapter DIR --out MODEL_DIR     adapter merged into its base (plain HF folder)
    fedclimb evaluate --adapter DIR --data ROOT       a checkpoint on a split, per domain, with baselines

Exit codes: 0 success, 1 the command ran and found a problem (invalid records, a
failed run, a simulation in which no round aggregated), 2 unusable arguments,
143 / 129 stopped by SIGTERM / SIGHUP during a simulation (after stopping its processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from simulation.processes import Terminated

__all__ = ["main", "build_parser"]


class _UsageError(Exception):
    """Arguments that cannot be used (exit code 2)."""


def _overrides_help() -> str:
    return "configuration overrides such as train.lr=1e-4 or presets such as model=smollm2-135m"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedclimb", description="Federated DRPO fine-tuning on CLIMB data.")
    p.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="run a whole federation on this machine (Flower simulation engine)")
    s.add_argument("--config", help="a fedclimb YAML file (default: configs/base.yaml)")
    s.add_argument("--hospitals", type=int, help="number of simulated hospitals (default 3)")
    s.add_argument("--data", help="a real CLIMB root to partition into hospitals (default: synthetic federation)")
    s.add_argument("--out", default="runs/simulate", help="run directory (default runs/simulate)")
    s.add_argument("--seed", type=int, help="seed for data, initialisation and sampling")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true", help="print nothing but the final report path")
    mode.add_argument("--jsonl", action="store_true", help="print one JSON object per round (for scripts)")
    s.add_argument("--verbose", action="store_true", help="also print the tail of Flower's log")
    s.add_argument("--compare", action="store_true",
                   help="compare local-only, FedAvg+GRPO, domain-aware+DRPO and centralised DRPO")
    s.add_argument("--seeds", type=int, default=1, help="with --compare: number of seeds (default 1)")
    s.add_argument("--arms", help="with --compare: comma-separated arms (default local-only,fedavg-grpo,"
                   "domain-drpo,centralised-drpo; also fedavg-grpo+ffa, fedavg-grpo+domain, fedavg-grpo+drpo, "
                   "centralised-grpo)")
    s.add_argument("overrides", nargs="*", help=_overrides_help())

    t = sub.add_parser("train-local", help="train one hospital's adapter locally (no federation)")
    t.add_argument("--data", required=True, help="the hospital's CLIMB root")
    t.add_argument("--steps", type=int, required=True, help="local DRPO steps")
    t.add_argument("--config", help="a fedclimb YAML file (default: configs/base.yaml)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="write the adapter here as a PEFT folder")
    t.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    t.add_argument("overrides", nargs="*", help=_overrides_help())

    d = sub.add_parser("data", help="CLIMB data tools").add_subparsers(dest="data_command", required=True)
    v = d.add_parser("validate", help="check every record of a CLIMB root")
    v.add_argument("root")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.add_argument("--domain-key", choices=("dataset", "modality"), default="dataset")
    v.add_argument("--no-media", action="store_true", help="do not decode media (structure only)")
    sy = d.add_parser("synth", help="write the synthetic federation")
    sy.add_argument("out")
    sy.add_argument("--hospitals", type=int, help="hospitals of the synthetic federation (default 3)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--scale", type=float, help="records per hospital, relative (default 1.0)")
    sy.add_argument("--overwrite", action="store_true")
    sy.add_argument("--graded", metavar="SHARES",
                    help="instead: one CLIMB root of five lab-panel domains with these training shares "
                         "(e.g. 40,25,15,8,2), the learning benchmark's pool (split it with simulation.partition)")
    sy.add_argument("--train-records", type=int, help="with --graded: training records in all (default 1000)")
    sy.add_argument("--test-records", type=int, help="with --graded: test records per domain, balanced (default 40)")
    fd = d.add_parser("from-dicom", help="convert a DICOM folder + labels CSV into CLIMB records (no PHI)")
    fd.add_argument("dicom_dir")
    fd.add_argument("out")
    fd.add_argument("--labels", required=True, help="CSV with a SOPInstanceUID, StudyInstanceUID or file column and a label column")
    fd.add_argument("--question", required=True, help="the question asked for every image")
    fd.add_argument("--salt-file", required=True, help="the hospital's secret pseudonymisation salt (created if missing; keep it outside OUT)")
    fd.add_argument("--options", help="answer options separated by '|' (default: the labels seen)")
    fd.add_argument("--modality", help="CLIMB modality folder (default: the DICOM Modality, lower case)")
    fd.add_argument("--dataset", help="dataset folder name (default: the DICOM folder's name)")
    fd.add_argument("--splits", default="0.8,0.1,0.1", help="train,valid,test fractions by patient")
    fd.add_argument("--frames", type=int, default=4, help="frames kept from a multi-frame DICOM")
    fd.add_argument("--allow-burned-in", action="store_true", help="keep images flagged BurnedInAnnotation=YES")
    ft = d.add_parser("from-table", help="convert a table (one row per patient) into CLIMB text records (pseudonymous ids)")
    ft.add_argument("out")
    src = ft.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", help="a CSV with a header row: numeric features, a label column, an id column")
    src.add_argument("--builtin", choices=("breast-cancer",), help="a real data set shipped with scikit-learn")
    ft.add_argument("--label-column", help="the CSV column holding the answer")
    ft.add_argument("--id-column", help="the CSV column holding the patient id (pseudonymised with the salt)")
    ft.add_argument("--features", help="comma-separated feature columns, in prompt order (default: all others)")
    ft.add_argument("--question", help="the question asked for every row")
    ft.add_argument("--salt-file", required=True, help="the hospital's secret pseudonymisation salt (created if missing; keep it outside OUT)")
    ft.add_argument("--options", help="answer options separated by '|' (default: the labels seen)")
    ft.add_argument("--modality", default="tabular", help="CLIMB modality folder (default tabular)")
    ft.add_argument("--dataset", help="dataset folder name (default: the CSV's name, or the built-in set's)")
    ft.add_argument("--splits", default="0.7,0.1,0.2", help="train,valid,test fractions by patient")
    ft.add_argument("--bands-only", action="store_true",
                    help="write each feature's band in words without its value (shorter prompts)")
    ft.add_argument("--balance-train", action="store_true",
                    help="keep as many training rows of every label as the rarest has (valid/test keep the table's mix)")

    pr = sub.add_parser("privacy", help="privacy ledger tools").add_subparsers(dest="privacy_command", required=True)
    rep = pr.add_parser("report", help="verify a hospital's privacy ledger, print it and the remaining budget")
    rep.add_argument("--state", required=True, help="the hospital's state directory")
    seal = pr.add_parser("seal", help="chain a version-1 ledger, or write a missing high-water mark "
                                      "(check the ledger against a backup first)")
    seal.add_argument("--state", required=True, help="the hospital's state directory")

    ex = sub.add_parser("export", help="merge an adapter into its base model and save a plain Hugging Face model folder")
    ex.add_argument("--adapter", required=True, help="a PEFT adapter folder, a round-XXXX folder or a run directory (uses latest)")
    ex.add_argument("--out", required=True, help="the model folder to write")
    ex.add_argument("--base", help="the base model id or folder (default: the adapter's base_model_name_or_path)")
    ex.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")

    ev = sub.add_parser("evaluate", help="evaluate an adapter (or the base model alone) per domain, with baselines")
    ev.add_argument("--adapter", help="a PEFT adapter folder, a round-XXXX folder or a run directory (default: none, the base model alone)")
    ev.add_argument("--base", help="the base model id or folder (default: the run's or --config's model)")
    ev.add_argument("--data", required=True, help="a CLIMB root")
    ev.add_argument("--split", default="test", help="the split to evaluate (default test)")
    ev.add_argument("--calibrate", metavar="SPLIT",
                    help="also report calibrated answers: each option's mean log-probability on SPLIT (e.g. valid) "
                         "is subtracted before the most likely option is taken (constrained answers only)")
    ev.add_argument("--out", help="where evaluation.json, evaluation.md and explanations/ go (default RUN_DIR/evaluation or ./evaluation)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    ev.add_argument("--explain", type=int, default=0, metavar="N", help="write a review PNG for N records spread over the domains")
    ev.add_argument("--records", help="comma-separated record ids to explain (instead of --explain N)")
    ev.add_argument("--config", help="a fedclimb YAML file (default: the run's config.yaml, else configs/base.yaml)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("overrides", nargs="*", help=_overrides_help())
    from server.coordinator_cli import add_parsers as add_coordinator_parsers

    add_coordinator_parsers(sub)  # fedclimb coordinator {init,start,run}
    from client.hospital_cli import add_parsers as add_hospital_parsers

    add_hospital_parsers(sub)  # fedclimb hospital {init,start}
    return p


# ----------------------------------------------------------------------------- commands


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from simulation.evaluate import evaluate_command

    return evaluate_command(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from simulation.export import export_merged

    try:
        out = export_merged(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    print(f"merged model written to {out}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from common.climb.limits import bounds_for
    from common.climb.records import annotation_files
    from common.climb.validate import validate_root
    from common.config import DataConfig

    root = Path(args.root)
    if not root.is_dir():
        raise _UsageError(f"{root} is not a directory")
    if not annotation_files(root):
        raise _UsageError(f"no annotation_<split>.jsonl files under {root} (expected <modality>/<dataset>/annotation_train.jsonl)")
    limits = DataConfig()  # the data.* limits a hospital gets by default (docs/data.md)
    report = validate_root(root, domain_key=args.domain_key, media=not args.no_media, bounds=bounds_for(limits),
                           max_images=limits.max_images)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.ok else 1
    print(f"{report.valid} valid record(s), {len(report.invalid)} invalid under {root}")
    for split in sorted(report.counts):
        mods = ", ".join(f"{m}: {n}" for m, n in sorted(report.modalities[split].items()))
        print(f"  {split}: {sum(report.counts[split].values())} records  (modalities {mods})")
        for dom, n in sorted(report.counts[split].items()):
            print(f"    {dom:<32} {n}")
    for p in report.invalid:
        print(f"INVALID {p.file}:{p.line}: {p.reason}")
    return 0 if report.ok else 1


def _cmd_synth(args: argparse.Namespace) -> int:
    from simulation.synth import generate_federation

    # Options of the other kind of pool are refused, not silently ignored; the ones given
    # are passed on, the others keep the generator's defaults.
    federation = _given(hospitals=args.hospitals, scale=args.scale)
    graded = _given(train_records=args.train_records, eval_records=args.test_records)
    flags = {"hospitals": "--hospitals", "scale": "--scale", "train_records": "--train-records",
             "eval_records": "--test-records"}
    named = [flags[key] for key in (federation if args.graded else graded)]
    if named:
        raise _UsageError(f"{', '.join(named)} " + (
            "does not apply to --graded, which writes one root (split it over hospitals with "
            "simulation.partition=dirichlet simulation.hospitals=N)" if args.graded else "needs --graded"))
    if args.graded:
        return _synth_graded(args, graded)
    try:
        summary = generate_federation(Path(args.out), seed=args.seed, overwrite=args.overwrite, **federation)
    except (ValueError, OSError) as exc:
        raise _UsageError(str(exc)) from None
    for root in summary.hospital_roots:
        print(f"{root}: " + ", ".join(
            f"{split} {sum(c.values())}" for split, c in summary.counts[root.name].items()))
    return 0


def _given(**values: Any) -> dict[str, Any]:
    """The keyword arguments the user set (argparse leaves the others None)."""
    return {k: v for k, v in values.items() if v is not None}


def _synth_graded(args: argparse.Namespace, sizes: dict[str, int]) -> int:
    from simulation.synth_graded import generate_graded, parse_shares

    try:
        counts = generate_graded(Path(args.out), shares=parse_shares(args.graded), seed=args.seed,
                                 overwrite=args.overwrite, **sizes)
    except (ValueError, OSError) as exc:
        raise _UsageError(str(exc)) from None
    total = sum(c["train"] for c in counts.values())
    for domain, c in counts.items():
        print(f"{domain}: train {c['train']} ({100 * c['train'] / total:.1f}%), valid {c['valid']}, test {c['test']}")
    print(f"{args.out}: one CLIMB root; simulate it with simulation.data_root={args.out} "
          "simulation.partition=dirichlet (or federation=benchmark)")
    return 0


def _cmd_from_dicom(args: argparse.Namespace) -> int:
    from client.dicom_import import convert_dicom_folder

    try:
        fractions = tuple(float(x) for x in args.splits.split(","))
    except ValueError:
        raise _UsageError(f"--splits must be three numbers like 0.8,0.1,0.1, got {args.splits!r}") from None
    if len(fractions) != 3:
        raise _UsageError(f"--splits needs three fractions (train,valid,test), got {args.splits!r}")
    for path, what in ((args.dicom_dir, "DICOM_DIR"), (args.labels, "--labels")):
        if not Path(path).exists():
            raise _UsageError(f"{what} {path} does not exist")
    try:
        summary = convert_dicom_folder(
            Path(args.dicom_dir), Path(args.out), Path(args.labels), args.question,
            salt_file=Path(args.salt_file),
            options=args.options.split("|") if args.options else None,
            modality=args.modality, dataset=args.dataset, split_fractions=fractions,  # type: ignore[arg-type]
            n_frames=args.frames, skip_burned_in=not args.allow_burned_in,
        )
    except (ValueError, OSError) as exc:
        raise _UsageError(str(exc)) from None
    print(summary.report())
    return 0


def _cmd_from_table(args: argparse.Namespace) -> int:
    from client.table_import import (BREAST_CANCER_QUESTION, breast_cancer_table, convert_table, read_csv_table,
                                     salt_for)

    try:
        fractions = [float(x) for x in args.splits.split(",")]
        features = [f.strip() for f in args.features.split(",")] if args.features else None
        if args.builtin:
            table = breast_cancer_table(features) if features else breast_cancer_table()
            question, dataset = args.question or BREAST_CANCER_QUESTION, args.dataset or "wdbc"
        else:
            if not args.label_column or not args.question:
                raise _UsageError("--csv needs --label-column and --question")
            table = read_csv_table(args.csv, label_column=args.label_column, id_column=args.id_column, features=features)
            question, dataset = args.question, args.dataset or Path(args.csv).stem
        summary = convert_table(table, Path(args.out), question=question, salt=salt_for(args.salt_file, args.out),
                                dataset=dataset, modality=args.modality,
                                options=args.options.split("|") if args.options else None, fractions=fractions,
                                values=not args.bands_only, balance_train=args.balance_train)
    except (ValueError, OSError) as exc:
        raise _UsageError(str(exc)) from None
    print(summary.report())
    return 0


def _cmd_privacy(args: argparse.Namespace) -> int:
    """``privacy report`` (verify and print) or ``privacy seal`` (adopt an older ledger)."""
    from common.privacy import ledger

    state = Path(args.state)
    if not state.is_dir():
        raise _UsageError(f"{state} is not a directory")
    action = {"report": ledger.report, "seal": ledger.seal}[args.privacy_command]
    try:
        print(action(state))
    except (ledger.LedgerError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_train_local(args: argparse.Namespace) -> int:
    from simulation.local import train_local_command

    return train_local_command(args)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from common.config import ConfigError
    from simulation.explain import explain_run, hospital_roots, link_in_report
    from simulation.report import write_report
    from simulation.simulate import config_for_cli, run_simulation

    try:
        cfg = config_for_cli(args.config, args.overrides, hospitals=args.hospitals, data=args.data, seed=args.seed)
    except ConfigError as exc:
        raise _UsageError(str(exc)) from None
    if args.arms and not args.compare:
        raise _UsageError("--arms needs --compare")
    if args.compare:
        from simulation.compare import ARMS, DEFAULT_ARMS, run_compare

        arms = tuple(a for a in (args.arms or "").split(",") if a) or DEFAULT_ARMS
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise _UsageError(f"--arms: unknown arm {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        return run_compare(cfg, Path(args.out), seeds=args.seeds, quiet=args.quiet, arms=arms)
    mode = "quiet" if args.quiet else "jsonl" if args.jsonl else "progress"
    result = run_simulation(cfg, Path(args.out), mode=mode, verbose=args.verbose)  # type: ignore[arg-type]
    failure = result.failure()  # did not finish, or no round aggregated
    if failure:
        print(f"fedclimb: {failure}", file=sys.stderr)
        return 1
    command = "fedclimb " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = write_report(result.run_dir, result.cfg, result.history, seconds=result.seconds, command=command)
    link_in_report(path, explain_run(result.run_dir, result.cfg, hospital_roots(result.run_dir), seed=result.cfg.seed))
    if mode == "progress":
        print(f"done in {result.seconds:.0f} s: {path}")
        table = path.read_text().split("## Test metrics per domain")[1].split("![")[0]
        print("Test metrics per domain" + table.rstrip())
    elif mode == "quiet":
        print(path)
    return 0


COMMANDS = {
    "simulate": _cmd_simulate,
    "train-local": _cmd_train_local,
    ("data", "validate"): _cmd_validate,
    ("data", "synth"): _cmd_synth,
    ("data", "from-dicom"): _cmd_from_dicom,
    ("data", "from-table"): _cmd_from_table,
    ("privacy", "report"): _cmd_privacy,
    ("privacy", "seal"): _cmd_privacy,
    "export": _cmd_export,
    "evaluate": _cmd_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    key = args.command
    if key == "coordinator":  # its own errors and exit codes (server/coordinator_cli.py)
        from server.coordinator_cli import main_for as coordinator_main

        return coordinator_main(args)
    if key == "hospital":  # its own errors and exit codes (client/hospital_cli.py)
        from client.hospital_cli import main_for as hospital_main

        return hospital_main(args)
    if key == "data":
        key = ("data", args.data_command)
    elif key == "privacy":
        key = ("privacy", args.privacy_command)
    try:
        return COMMANDS[key](args)
    except _UsageError as exc:
        print(f"fedclimb: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:  # SIGTERM / SIGHUP: the processes it started are already stopped
        print(f"fedclimb: {exc}; every process it started was stopped", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    raise SystemExit(main())
