"""common/fab.py: the app's FAB is byte-identical for identical code and hashed as Flower hashes it."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from common import fab as fabmod
from common.config import config_dir
from common.fab import APP_PACKAGES, build_app_dir, build_fab, fab_digest, installed_app_digest, is_digest

ROOT = Path(__file__).resolve().parents[2]
# Flower's builder uses a pathspec API that pathspec deprecates (one warning per pattern).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fab(tmp_path_factory.mktemp("fab"))


def test_two_builds_are_byte_identical_and_digest_is_flowers_hash(built: Path, tmp_path: Path) -> None:
    again = build_fab(tmp_path)
    data = built.read_bytes()
    assert again.read_bytes() == data
    assert again.name == built.name
    expected = "sha256:" + hashlib.sha256(data).hexdigest()
    assert fab_digest(built) == fab_digest(data) == expected == installed_app_digest()
    assert is_digest(expected) and not is_digest("sha256:" + "A" * 64) and not is_digest(expected[7:])
    # What `flwr run <out>/fedclimb` builds and submits (Flower's builder) is this file.
    assert build_fab_from_disk(built.parent / fabmod.APP_DIR_NAME) == data


def test_fab_holds_the_packages_and_configs_only(built: Path) -> None:
    names = zipfile.ZipFile(built).namelist()
    assert "pyproject.toml" in names and ".info/CONTENT" in names
    assert {n.split("/")[0] for n in names} == {*APP_PACKAGES, "configs", "pyproject.toml", ".info"}
    assert "client/client_app.py" in names and "configs/model/tiny.yaml" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/_configs/" in n]
    shipped = {n for n in names if n.startswith("configs/")}
    on_disk = {"configs/" + p.relative_to(config_dir()).as_posix() for p in config_dir().rglob("*.yaml")}
    assert shipped == on_disk


def test_app_pyproject_matches_the_repository(built: Path) -> None:
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    app = tomllib.loads(zipfile.ZipFile(built).read("pyproject.toml").decode())
    for key in ("components", "config"):
        assert app["tool"]["flwr"]["app"][key] == repo["tool"]["flwr"]["app"][key]
    assert app["tool"]["flwr"]["app"]["publisher"] == repo["tool"]["flwr"]["app"]["publisher"]
    assert app["project"]["name"] == repo["project"]["name"]
    assert app["project"]["version"] == repo["project"]["version"]


def test_changed_client_code_changes_the_digest(built: Path, tmp_path: Path) -> None:
    app = tmp_path / "fedclimb"
    shutil.copytree(built.parent / fabmod.APP_DIR_NAME, app)
    path = app / "client" / "client_app.py"
    path.write_text(path.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    assert fab_digest(build_fab_from_disk(app)) != fab_digest(built)


def test_an_app_folder_unpacked_from_the_fab_rebuilds_the_same_fab(built: Path, tmp_path: Path) -> None:
    app = tmp_path / "fedclimb"
    with zipfile.ZipFile(io.BytesIO(built.read_bytes())) as zf:
        zf.extractall(app)
    shutil.rmtree(app / ".info")
    assert fab_digest(build_fab_from_disk(app)) == fab_digest(built)


def test_a_wheel_layout_gives_the_same_digest(tmp_path: Path) -> None:
    """A non-editable install: packages in site-packages, configs in common/_configs."""
    site = tmp_path / "site"
    for name in APP_PACKAGES:
        shutil.copytree(ROOT / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", site / "common" / "_configs")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import common.fab as f; "
            "print(f.__file__); print(f.installed_app_digest())")
    out = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, check=True,
                         cwd=tmp_path, timeout=120).stdout.split()
    assert out[0] == str(site / "common" / "fab.py")
    assert out[1] == installed_app_digest()


def test_build_app_dir_refuses_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(fabmod.FabError, match="exists"):
        build_app_dir(tmp_path)
