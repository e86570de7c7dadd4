"""`fedclimb export`: a federation's adapter merged into its base, as a plain HF model folder.

The result loads with ``transformers`` alone (``AutoModel*.from_pretrained(OUT)``), with
the base's tokenizer and processor files beside the weights; fedclimb is not needed to
use it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["adapter_folder", "export_merged"]

# Files that travel from the base folder to the export unchanged (tokenizer, processor, chat template).
_BESIDE_WEIGHTS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)


def adapter_folder(path: str | Path) -> Path:
    """A PEFT adapter folder, given the folder itself, a round folder or a run directory."""
    path = Path(path)
    for candidate in (path, path / "adapter", path / "latest" / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: no adapter_config.json here, in {path / 'adapter'} or in {path / 'latest' / 'adapter'} "
        "(give a PEFT adapter folder, a round-XXXX folder or a run directory)"
    )


def _base_of(adapter: Path, base: str | None) -> str:
    if base:
        return base
    named = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not named:
        raise ValueError(f"{adapter}/adapter_config.json names no base model; pass --base")
    return str(named)


def export_merged(adapter: str | Path, out: str | Path, *, base: str | None = None, overwrite: bool = False) -> Path:
    """Merge ``adapter`` into its base and save the merged model (safetensors) to ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    folder = adapter_folder(adapter)
    base_path = _base_of(folder, base)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    config = AutoConfig.from_pretrained(base_path)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = cls.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    local = Path(base_path)
    if local.is_dir():
        for name in _BESIDE_WEIGHTS:
            if (local / name).is_file() and not (out / name).exists():
                shutil.copy2(local / name, out / name)
    log.info("merged %s into %s -> %s", folder, base_path, out)
    return out
