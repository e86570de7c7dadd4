"""`fedclimb hospital {init,start}`: a hospital IT team's two commands.

    fedclimb hospital init DIR --coordinator HOST:PORT --ca CA.crt --data ROOT [--name NAME]
                               [--state PATH] [--insecure] [--force] [--new-settings]
    fedclimb hospital start DIR [--insecure]

simulation/cli.py adds these with :func:`add_parsers` and calls :func:`main_for`.
Exit codes: 0 done (start: stopped by a signal), 1 a check failed or a process it ran
exited, 2 unusable arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parsers", "main_for"]


def add_parsers(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    """Add the ``hospital`` command group to the fedclimb parser."""
    group = sub.add_parser("hospital", help="run a hospital of a real federation (SuperNode, keys, checks)")
    cmds = group.add_subparsers(dest="hospital_command", required=True)

    init = cmds.add_parser("init", help="create the hospital folder: settings, node key, checks of the data")
    init.add_argument("dir", help="the hospital folder (created)")
    init.add_argument("--coordinator", required=True, metavar="HOST:PORT",
                      help="the coordinator's SuperLink address, as the coordinator gave it")
    init.add_argument("--ca", type=Path, metavar="CA.crt",
                      help="the coordinator's CA certificate (required unless --insecure)")
    init.add_argument("--data", required=True, type=Path, metavar="ROOT", help="this hospital's CLIMB data root")
    init.add_argument("--name", help="this hospital's name in the federation (default: the folder's name)")
    init.add_argument("--state", metavar="PATH",
                      help="the state folder (privacy ledger, audit log); default DIR/state. "
                           "In a container, the state volume's path, e.g. /state")
    init.add_argument("--insecure", action="store_true",
                      help="no TLS and no node key (closed test networks only)")
    init.add_argument("--force", action="store_true",
                      help="make a new node key (the coordinator must admit it again); an existing hospital.yaml "
                           "is kept as it is, with your edits (the state folder is always kept)")
    init.add_argument("--new-settings", action="store_true",
                      help="write a fresh hospital.yaml over an existing one, which is kept as "
                           "hospital.yaml.previous (copy back what you had changed, e.g. approved_apps)")

    start = cmds.add_parser("start", help="check the settings and data, then run the SuperNode in the foreground")
    start.add_argument("dir", help="the hospital folder (holds hospital.yaml)")
    start.add_argument("--insecure", action="store_true",
                       help="this start without TLS and node authentication (closed test networks only)")


def _init(args: argparse.Namespace) -> int:
    from client.hospital_setup import init_hospital

    if not args.insecure and args.ca is None:
        print("fedclimb: error: --ca CA.crt is required (or --insecure for a closed test network)", file=sys.stderr)
        return 2
    r = init_hospital(Path(args.dir), coordinator=args.coordinator, ca=args.ca, data=args.data, name=args.name,
                      state=args.state, insecure=args.insecure, force=args.force, new_settings=args.new_settings)
    print(f"hospital folder {r.config.parent}")
    if r.kept_settings:
        print(f"  settings: {r.config} kept as it was, your edits included (approved_apps, privacy, limits); "
              "--new-settings writes a fresh one")
    else:
        print(f"  settings: {r.config} (privacy unit {r.unit}; limits fit the federation presets)")
    if r.previous is not None:
        print(f"  the replaced settings are in {r.previous}: copy back what you had changed (e.g. approved_apps)")
    for line in r.data.lines():
        print(f"  data {line}")
    if r.approved:
        print(f"  approved app: {r.digest} (this installation's fedclimb)")
    else:
        print(f"  note: this installation's app {r.digest} is not in approved_apps of {r.config}; add it there to "
              "run this version")
    if r.state_note:
        print(f"  note: {r.state_note}")
    if r.public_key is None:
        print("  INSECURE: no node key; the coordinator must also run with --insecure")
    else:
        print(f"send this one file to the coordinator: {r.public_key}")
    print(f"next: fedclimb hospital start {args.dir}")
    return 0


def _start(args: argparse.Namespace) -> int:
    from client.hospital_start import start_hospital

    return start_hospital(Path(args.dir), insecure=args.insecure)


def main_for(args: argparse.Namespace) -> int:
    """Run ``fedclimb hospital <command>``; a failed check prints its reason and returns 1."""
    from client.hospital_checks import HospitalCheckError

    handler = {"init": _init, "start": _start}[args.hospital_command]
    try:
        return handler(args)
    except HospitalCheckError as exc:
        print(f"fedclimb hospital: refusing to {args.hospital_command}: {exc}", file=sys.stderr)
        return 1
