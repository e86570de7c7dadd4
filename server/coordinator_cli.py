"""`fedclimb coordinator {init,start,run}`: the coordinator's three commands.

    fedclimb coordinator init DIR --address HOST:PORT [--san NAME ...] [--force] [--insecure]
    fedclimb coordinator start DIR [--insecure]
    fedclimb coordinator run DIR [--config FILE] [key=value ...]

simulation/cli.py adds these with :func:`add_parsers` and calls :func:`main_for`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["add_parsers", "main_for", "HANDLERS"]


def add_parsers(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    """Add the ``coordinator`` command group to the fedclimb parser."""
    group = sub.add_parser("coordinator", help="run a real federation's coordinator (SuperLink, hospitals, runs)")
    cmds = group.add_subparsers(dest="coordinator_command", required=True)

    init = cmds.add_parser("init", help="create the coordinator directory: CA, server certificate, configs")
    init.add_argument("dir", help="the coordinator directory (created)")
    init.add_argument("--address", required=True, metavar="HOST:PORT",
                      help="the address hospitals dial, e.g. coordinator.example.org:9092")
    init.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="another host name or IP address hospitals may dial (repeatable)")
    init.add_argument("--force", action="store_true",
                      help="issue a new server certificate over an existing one (the CA is kept)")
    init.add_argument("--insecure", action="store_true",
                      help="no TLS and no hospital authentication (closed test networks only)")

    start = cmds.add_parser("start", help="run the SuperLink in the foreground and admit hospitals")
    start.add_argument("dir", help="the coordinator directory")
    start.add_argument("--insecure", action="store_true",
                       help="this start without TLS and hospital authentication (closed test networks only)")

    run = cmds.add_parser("run", help="run (or resume) the federation and print one line per round")
    run.add_argument("dir", help="the coordinator directory")
    run.add_argument("--config", help="a fedclimb YAML file instead of DIR/federation.yaml")
    run.add_argument("overrides", nargs="*", help="configuration overrides such as federation.rounds=5")


def _init(args: argparse.Namespace) -> int:
    from server.coordinator import init_coordinator, insecure_warning

    d, s = init_coordinator(Path(args.dir), args.address, list(args.san), force=args.force, insecure=args.insecure)
    print(f"coordinator directory {d.root}")
    print(f"  hospitals dial {s.address}; the SuperLink listens on {s.listen}:{s.port}")
    if s.insecure:
        print("  " + insecure_warning())
    else:
        print(f"  server certificate for {', '.join(s.sans)}")
        print(f"  send {d.ca_cert} to every hospital (the one file that travels to them)")
    print(f"  edit {d.federation} (preset, domains, rounds, min_hospitals)")
    print(f"  admit a hospital: copy its NAME.pub into {d.hospitals}/")
    print(f"next: fedclimb coordinator start {args.dir}   (and, in another terminal, fedclimb coordinator run "
          f"{args.dir})")
    return 0


def _start(args: argparse.Namespace) -> int:
    from server.coordinator import load_settings
    from server.superlink import serve

    d, s = load_settings(Path(args.dir))
    return serve(d, s, insecure=args.insecure)


def _run(args: argparse.Namespace) -> int:
    from server.coordinator_run import run_command

    return run_command(Path(args.dir), config=args.config, overrides=list(args.overrides))


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"init": _init, "start": _start, "run": _run}


def main_for(args: argparse.Namespace) -> int:
    """Run one ``coordinator`` command; errors a coordinator can act on print as one line (exit 2)."""
    from common.config import ConfigError
    from server.coordinator import CoordinatorError
    from server.coordinator_run import RunError
    from server.superlink import StartError

    try:
        return HANDLERS[args.coordinator_command](args)
    except (CoordinatorError, StartError, ConfigError) as exc:
        print(f"fedclimb coordinator {args.coordinator_command}: error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"fedclimb coordinator run: {exc}", file=sys.stderr)
        return exc.code
