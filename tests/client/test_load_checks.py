"""Loading a hospital's data runs `data validate`'s checks: no record can fail a round when first sampled.

A record whose mask, media or prompt would fail in a round is left out at load time with its
reason in the log (issue: a failed round tells the server that a bad record was drawn).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import png_header
from client.runtime import Runtime
from client.site import Site
from common.config import HospitalConfig, load_config
from simulation.synth import generate_federation

CXR = "chest_xray/synth_cxr"
QUESTION = ("<image>\nAbove is a chest X-ray image of a patient. What is the diagnosis? "
            "Answer with one phrase from the following:\nNormal\nPneumonia")


def _record(image: str, **extra: object) -> str:
    turns = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "Normal"}]
    return json.dumps({"conversations": turns, "images": [image], "dataset": "synth_cxr", **extra})


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-hospital synthetic root with hostile records appended to its chest X-ray training file."""
    base = tmp_path_factory.mktemp("load-checks")
    root = generate_federation(base / "fed", hospitals=1, seed=0, scale=0.1).hospital_roots[0]
    images = root / CXR / "images"
    good = sorted(images.iterdir())[0].relative_to(root).as_posix()
    png_header(images / "bomb-mask.png", 30000, 30000)
    (base / "outside.png").write_bytes((root / good).read_bytes())
    (images / "link.png").symlink_to(base / "outside.png")
    hostile = {
        "bomb mask": _record(good, segmentation_path=f"{CXR}/images/bomb-mask.png"),
        "missing mask": _record(good, segmentation_path=f"{CXR}/images/no-such-mask.png"),
        "box outside the image": _record(good, bbox=[0, 0, 5000, 5000]),
        "image linked out of the root": _record(f"{CXR}/images/link.png"),
        "long question": _record(good).replace("What is the diagnosis?", "What is the diagnosis? " + "lung " * 3000),
    }
    path = root / CXR / "annotation_train.jsonl"
    first = len(path.read_text(encoding="utf-8").splitlines()) + 1
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in hostile.values()))
    root.joinpath("hostile.json").write_text(json.dumps({k: first + i for i, k in enumerate(hostile)}))
    return root


def _load(root: Path, tmp_path: Path, *overrides: str):
    cfg = load_config(overrides=[f"data.root={root}", "model.device=cpu", "model.precision=fp32", *overrides])
    site = Site("hospital-0", HospitalConfig(name="hospital-0", data_root=str(root), state_dir=str(tmp_path)), True)
    return Runtime().hospital_data(site, cfg)


def test_records_that_would_fail_in_a_round_are_left_out_at_load_with_their_reason(root: Path, tmp_path: Path,
                                                                                  caplog: pytest.LogCaptureFixture):
    lines = json.loads((root / "hostile.json").read_text())
    with caplog.at_level(logging.WARNING):
        data = _load(root, tmp_path, "data.max_prompt_tokens=2000")
    kept = {r.id for r in data.train}
    for what, line in lines.items():
        assert f"{CXR}/annotation_train.jsonl:{line}" not in kept, what
    assert len(data.train) >= 20  # the synthetic records themselves all pass
    log = caplog.text
    assert "data.max_pixels" in log and "segmentation mask not found" in log and "lies outside the" in log
    assert "outside the data root" in log and "longer than data.max_prompt_tokens=2000" in log


def test_the_prompt_token_limit_comes_from_the_config(root: Path, tmp_path: Path) -> None:
    line = json.loads((root / "hostile.json").read_text())["long question"]
    data = _load(root, tmp_path, "data.max_prompt_tokens=100000")
    assert f"{CXR}/annotation_train.jsonl:{line}" in {r.id for r in data.train}
