"""The Flower app bundle (FAB) of this installation: the code a coordinator ships to hospitals.

A FAB is the zip file ``flwr run`` builds from an app folder and sends to every
SuperNode, whose ClientApp process then imports its code next to the hospital's data.
A hospital approves a FAB by its digest (``sha256:<hex>`` of the FAB's bytes, the hash
Flower itself keys FABs by: ``hashlib.sha256(fab).hexdigest()``), so the FAB of a given
fedclimb version must come out byte-identical wherever it is built.

:func:`build_app_dir` lays out the app folder from the installed packages only, the
same way from a source checkout and from a (non-editable) pip install:

    pyproject.toml     the app's own, written from APP_PYPROJECT (name, version, components)
    common/ client/ server/ simulation/    every *.py of the installed packages
    configs/           the config presets (a checkout's configs/, a wheel's common/_configs)

:func:`build_fab` zips that folder with Flower's own builder
(``flwr.cli.build.build_fab_from_disk``: fixed timestamps, sorted members, its manifest), so
``flwr run <out>/fedclimb`` submits exactly the bytes written to the ``.fab`` file.
The bytes depend on the code, the configs, the version and on zlib's deflate output (the
Python build's zlib); nothing machine-specific (paths, times, file modes) goes in.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from common.config import config_dir

__all__ = [
    "APP_DIR_NAME",
    "APP_PACKAGES",
    "DIGEST_PREFIX",
    "FabError",
    "app_pyproject",
    "build_app_dir",
    "build_fab",
    "fab_digest",
    "installed_app_digest",
    "is_digest",
]

#: The import packages that make up the app (pyproject.toml's wheel packages).
APP_PACKAGES: tuple[str, ...] = ("common", "client", "server", "simulation")
#: The app folder's name inside build_fab's out_dir (``flwr run <out_dir>/fedclimb``).
APP_DIR_NAME = "fedclimb"
DIGEST_PREFIX = "sha256:"
_WHEEL_CONFIGS = "_configs"  # where a wheel keeps configs/ (inside common/)
_DIST_NAME = "fedclimb"

# The app's pyproject.toml. [tool.flwr.app] must match the repository's pyproject.toml
# (tests/common/test_fab.py checks it); the dependencies are not installed by Flower
# (fedclimb starts every SuperLink and SuperNode without runtime dependency installation).
_PYPROJECT = """\
[project]
name = "fedclimb"
version = "{version}"
description = "Federated DRPO fine-tuning of multimodal clinical models across hospitals (CLIMB format, LoRA, record-level DP)."
license = "Apache-2.0"
dependencies = ["flwr[simulation]==1.42.0"]

[tool.flwr.app]
publisher = "fedclimb"

[tool.flwr.app.components]
serverapp = "server.server_app:app"
clientapp = "client.client_app:app"

[tool.flwr.app.config]
config-file = ""
overrides = ""
sim-root = "auto"
"""


class FabError(RuntimeError):
    """The app folder or FAB cannot be built from this installation."""


def _version() -> str:
    """fedclimb's version: the installed distribution's, else a checkout's pyproject.toml."""
    try:
        return metadata.version(_DIST_NAME)
    except metadata.PackageNotFoundError:
        pass
    pyproject = _packages_root() / "pyproject.toml"
    try:
        import tomllib

        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError, ValueError) as exc:
        raise FabError(f"fedclimb is not installed and {pyproject} gives no version: {exc}") from None


def app_pyproject() -> str:
    """The text of the app's pyproject.toml for this fedclimb version."""
    return _PYPROJECT.format(version=_version())


def _packages_root() -> Path:
    """The folder holding the app packages: a checkout's root, or site-packages."""
    return Path(__file__).resolve().parent.parent


def _package_files(package: Path) -> list[Path]:
    """Every ``*.py`` under ``package`` (caches and a wheel's ``common/_configs`` left out)."""
    files = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if "__pycache__" in rel.parts or rel.parts[0] == _WHEEL_CONFIGS or path.is_symlink():
            continue
        files.append(path)
    return files


def build_app_dir(app_dir: Path) -> Path:
    """Lay out the app folder of this installation in ``app_dir`` (created; must not exist).

    Returns
    -------
    Path
        ``app_dir``, ready for ``flwr run app_dir CONNECTION``.

    Raises
    ------
    FabError
        If ``app_dir`` exists or an app package or the configs are missing.
    """
    app_dir = Path(app_dir)
    if app_dir.exists():
        raise FabError(f"{app_dir} exists; build the app folder into a new directory")
    root = _packages_root()
    configs = config_dir()
    if not configs.is_dir():
        raise FabError(f"the config presets are missing ({configs}); reinstall fedclimb")
    app_dir.mkdir(parents=True)
    for name in APP_PACKAGES:
        package = root / name
        if not (package / "__init__.py").is_file():
            raise FabError(f"package {name!r} not found beside {root / 'common'}; reinstall fedclimb")
        for path in _package_files(package):
            target = app_dir / name / path.relative_to(package)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    for path in sorted(configs.rglob("*")):
        if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
            target = app_dir / "configs" / path.relative_to(configs)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (app_dir / "pyproject.toml").write_text(app_pyproject(), encoding="utf-8")
    return app_dir


def _zip_app_dir(app_dir: Path) -> bytes:
    """The FAB Flower builds from ``app_dir`` (what ``flwr run app_dir`` submits)."""
    from flwr.cli.build import build_fab_from_disk  # Flower's CLI stack, only when building

    try:
        return build_fab_from_disk(app_dir)
    except ValueError as exc:
        raise FabError(f"Flower refused to bundle {app_dir}: {exc}") from None


def build_fab(out_dir: Path) -> Path:
    """Build this installation's FAB into ``out_dir`` and return the ``.fab`` file.

    Writes ``out_dir/fedclimb/`` (the app folder: ``flwr run out_dir/fedclimb CONNECTION``
    submits these very bytes) and ``out_dir/fedclimb.<version>.<hex8>.fab``. Both are
    replaced if present.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    app_dir = out_dir / APP_DIR_NAME
    if app_dir.exists():
        shutil.rmtree(app_dir)
    build_app_dir(app_dir)
    fab = _zip_app_dir(app_dir)
    hexdigest = hashlib.sha256(fab).hexdigest()
    path = out_dir / f"fedclimb.{_version()}.{hexdigest[:8]}.fab"
    for old in out_dir.glob("fedclimb.*.fab"):
        if old != path:
            old.unlink()
    path.write_bytes(fab)
    return path


def fab_digest(fab: Path | bytes) -> str:
    """``sha256:<hex>`` of a FAB (a file or its bytes): Flower's FAB hash, prefixed."""
    data = fab if isinstance(fab, bytes | bytearray) else Path(fab).read_bytes()
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def is_digest(text: str) -> bool:
    """Whether ``text`` is a well-formed ``sha256:<64 lower-case hex>`` digest."""
    hexpart = text[len(DIGEST_PREFIX):]
    return text.startswith(DIGEST_PREFIX) and len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart)


@functools.lru_cache(maxsize=1)
def installed_app_digest() -> str:
    """The digest of :func:`build_fab` for this installation (built once per process)."""
    with tempfile.TemporaryDirectory(prefix="fedclimb-fab-") as tmp:
        return fab_digest(_zip_app_dir(build_app_dir(Path(tmp) / APP_DIR_NAME)))
