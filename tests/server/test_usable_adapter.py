"""A checkpointed adapter is usable the way a Hugging Face user would use it.

Plain ``transformers`` + ``peft`` (fedclimb not imported, in a fresh interpreter) load
the base the adapter names and the adapter onto it, and the logits change; ``fedclimb
export`` writes a merged model folder that ``transformers`` loads alone and whose logits
equal the base+adapter ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.config import load_config
from common.modeling.lora import init_adapter
from common.modeling.shapes import adapter_shapes_for
from server.checkpoint import save_round
from server.federation import base_for_adapters
from simulation.cli import main

_PLAIN = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    adapter, merged = sys.argv[1], sys.argv[2]
    base_path = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, adapter).eval()
        after = tuned(input_ids=ids).logits
    out = {"changed": float((after - before).abs().max())}
    if merged != "-":
        m = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
        with torch.no_grad():
            out["merged_vs_peft"] = float((m(input_ids=ids).logits - after).abs().max())
    ours = sorted(n for n in sys.modules if n.split(".")[0] in {"common", "client", "server", "simulation"})
    out["fedclimb_modules"] = ours
    print(json.dumps(out))
    """
)


def _plain(adapter: Path, merged: Path | None, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _PLAIN, str(adapter), str(merged or "-")], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("usable")
    cfg = load_config(overrides=[f"model.cache_dir={tmp / 'cache'}"])
    run = tmp / "run"
    run.mkdir()
    base = base_for_adapters(cfg, run)
    adapter = init_adapter(adapter_shapes_for(cfg.model, cfg.lora), seed=3, b_std=0.5)
    save_round(run, 1, adapter, {"strategy": {}}, lora=cfg.lora, base_model_name=base)
    return run


def test_the_tiny_base_is_kept_once_in_the_run_directory(run_dir):
    named = json.loads((run_dir / "latest" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(named) == (run_dir / "base").resolve()
    assert (run_dir / "base" / "config.json").is_file()
    assert (run_dir / "base" / "model.safetensors").is_file()
    assert (run_dir / "base" / "tokenizer.json").is_file()


def test_plain_peft_loads_the_checkpoint_and_changes_the_logits(run_dir, tmp_path):
    out = _plain(run_dir / "latest" / "adapter", None, tmp_path)
    assert out["fedclimb_modules"] == []
    assert out["changed"] > 1e-4


def test_export_writes_a_merged_model_transformers_loads_alone(run_dir, tmp_path):
    merged = tmp_path / "merged"
    assert main(["export", "--adapter", str(run_dir), "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not any(p.name.startswith("adapter_") for p in merged.iterdir())
    out = _plain(run_dir / "latest" / "adapter", merged, tmp_path)
    assert out["fedclimb_modules"] == []
    assert out["changed"] > 1e-4
    assert out["merged_vs_peft"] < 1e-4
    # A second export into the same folder is refused without --overwrite (exit 2).
    assert main(["export", "--adapter", str(run_dir), "--out", str(merged)]) == 2


def test_export_names_a_missing_adapter(tmp_path, capsys):
    assert main(["export", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
