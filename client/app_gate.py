"""The hospital's ``flwr-clientapp``: runs a coordinator's app (FAB) only if the hospital approved it.

``fedclimb hospital start`` runs the SuperNode with ``--isolation process`` and starts
Flower's SuperExec itself, with a folder first on its PATH whose ``flwr-clientapp`` runs
``python -I -m client.app_gate --hospital-config HOSPITAL_YAML ...``. For every message,
SuperExec launches that command instead of Flower's, and this module:

1. pulls the task (message, context, run, FAB bytes) from the SuperNode, as Flower's
   ``flwr-clientapp`` does;
2. hashes the FAB bytes it received (``sha256:<hex>``, Flower's FAB hash) and reads
   ``approved_apps`` from hospital.yaml afresh (approving takes no restart);
3. if the digest is not approved, or the FAB's claimed hash is not the hash of its
   bytes, sends an error reply, logs the digest and how to approve it, appends a line to
   ``<state_dir>/audit.jsonl`` and exits: the FAB is never unpacked, nothing of it is
   imported;
4. otherwise hands over to Flower's own ``flwr-clientapp`` code, which unpacks the FAB
   into a Flower home of this digest only (``<state_dir>/apps/<hex>``) and runs it.

Only the standard library, PyYAML and Flower are imported here: the check runs in code
installed at the hospital, before the FAB's folder is on ``sys.path``. The fedclimb
packages imported to start this module are dropped from ``sys.modules`` before the FAB is
loaded, so the approved FAB's own code is what runs.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["AppRefused", "approved_apps", "check_fab", "main"]

DIGEST_PREFIX = "sha256:"
#: The packages of the app; dropped from sys.modules before an approved FAB is loaded.
APP_PACKAGES = ("common", "client", "server", "simulation")
_PREFIX = "fedclimb hospital"
#: Exit status of a task process whose app was refused.
EXIT_REFUSED = 3


class AppRefused(RuntimeError):
    """The FAB is not approved by this hospital (or its settings cannot be read)."""


def _settings(hospital_yaml: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(hospital_yaml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise AppRefused(f"cannot read {hospital_yaml}: {exc}") from None
    if not isinstance(data, dict):
        raise AppRefused(f"{hospital_yaml} is not a mapping")
    return data


def approved_apps(hospital_yaml: Path) -> list[str]:
    """The ``approved_apps`` digests of ``hospital_yaml`` (AppRefused when unreadable)."""
    value = _settings(hospital_yaml).get("approved_apps") or []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise AppRefused(f"approved_apps in {hospital_yaml} must be a list of \"sha256:<hex>\" strings")
    return [x.strip().lower() for x in value]


def state_dir(hospital_yaml: Path) -> Path | None:
    """The hospital's state folder (relative to the file, as common.config resolves it)."""
    try:
        raw = _settings(hospital_yaml).get("state_dir") or ""
    except AppRefused:
        return None
    if not raw:
        return None
    path = Path(str(raw))
    return path if path.is_absolute() else hospital_yaml.resolve().parent / path


def check_fab(content: bytes, claimed_hash: str, hospital_yaml: Path) -> str:
    """The FAB's digest if ``hospital_yaml`` approves it; raises :class:`AppRefused` otherwise."""
    hexdigest = hashlib.sha256(content).hexdigest()
    digest = DIGEST_PREFIX + hexdigest
    if claimed_hash and claimed_hash != hexdigest:
        raise AppRefused(f"the FAB's bytes hash to {digest} but it was announced as sha256:{claimed_hash}")
    approved = approved_apps(hospital_yaml)
    if digest not in approved:
        listed = ", ".join(approved) if approved else "none"
        raise AppRefused(
            f"app {digest} is not approved by this hospital (approved_apps in {hospital_yaml}: {listed}). "
            f"Nothing of it was run. If the coordinator announced this digest for a fedclimb version you "
            f"accept (`fedclimb coordinator run` prints it), add \"{digest}\" to approved_apps in "
            f"{hospital_yaml}; the next message uses it, no restart needed"
        )
    return digest


def _say(text: str) -> None:
    print(f"{_PREFIX}: {text}", file=sys.stderr, flush=True)


def _audit_refusal(hospital_yaml: Path, digest: str, run_id: int, reason: str) -> None:
    folder = state_dir(hospital_yaml)
    if folder is None or not folder.is_dir():
        return
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "kind": "app_refused", "run_id": run_id, "app": digest, "status": "refused", "reason": reason}
    with open(folder / "audit.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")


def _drop_app_modules() -> None:
    """Forget the installed fedclimb modules so the approved FAB's own code is imported."""
    for name in list(sys.modules):
        if name.split(".")[0] in APP_PACKAGES:
            del sys.modules[name]


def _gated(runtime: Any, hospital_yaml: Path, apps_home: Path) -> Callable[[Any], tuple[Any, Any, Any, Any]]:
    """Flower's ``pull_task_input`` (of module ``runtime``) followed by the approval check."""
    pull, push_message, push_task_output = runtime.pull_task_input, runtime.push_message, runtime.push_task_output
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus

    def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
        message, context, run, fab = pull(client)
        digest = DIGEST_PREFIX + hashlib.sha256(fab.content).hexdigest()
        try:
            check_fab(fab.content, fab.hash_str, hospital_yaml)
        except AppRefused as exc:
            _say(f"REFUSED run {run.run_id} ({run.fab_id} {run.fab_version}): {exc}")
            _audit_refusal(hospital_yaml, digest, int(run.run_id), str(exc).split(" (approved_apps")[0])
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
                                 reason=f"the hospital has not approved app {digest}"), reply_to=message)
            push_message(client, reply, context)
            push_task_output(client, context, SubStatus.FAILED, f"app {digest} refused by the hospital")
            # Exit here: Flower's handler would print the refusal again as a traceback.
            sys.stderr.flush()
            os._exit(EXIT_REFUSED)
        # Each approved digest gets its own Flower home: no other FAB's files (e.g. one whose
        # hash shares the 8 characters Flower names app folders by) can be loaded in its place.
        os.environ["FLWR_HOME"] = str(apps_home / digest[len(DIGEST_PREFIX):])
        _drop_app_modules()
        _say(f"running approved app {digest} for run {run.run_id}")
        return message, context, run, fab

    return pull_task_input


def main(argv: list[str] | None = None) -> None:
    """``flwr-clientapp`` with the approval check; other arguments go to Flower's."""
    parser = argparse.ArgumentParser(prog="flwr-clientapp (fedclimb hospital)", add_help=False)
    parser.add_argument("--hospital-config", required=True, type=Path)
    parser.add_argument("--apps-home", required=True, type=Path)
    ours, rest = parser.parse_known_args(argv)
    # Modules, not the names the packages re-export (flwr.supernode.cli.flwr_clientapp is
    # also the function's name).
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    runtime.pull_task_input = _gated(runtime, ours.hospital_config.resolve(), ours.apps_home.resolve())
    sys.argv = ["flwr-clientapp", *rest]
    cli.flwr_clientapp()


if __name__ == "__main__":
    main()
