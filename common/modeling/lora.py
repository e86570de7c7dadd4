"""LoRA adapters: attaching them (language model only), initialising, exporting.

An adapter travels and is stored as a plain ``name -> tensor`` dict whose names are
PEFT's own state-dict keys (``...q_proj.lora_A.weight``), so a saved adapter folder is a
standard PEFT folder. The initial adapter is a pure function of (shapes, seed): the
server and every hospital compute the same tensors without exchanging anything, which is
what lets `ffa` keep A frozen from a shared seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.config import LoraSettings

__all__ = [
    "with_zero_b",
    "target_regex",
    "peft_lora_config",
    "attach_lora",
    "adapter_state",
    "load_adapter_state",
    "init_adapter",
    "adapter_shapes",
    "freeze_lora_a",
    "save_peft_folder",
    "read_peft_folder",
    "is_lora_a",
    "is_lora_b",
]

_A = ".lora_A.weight"
_B = ".lora_B.weight"


def is_lora_a(name: str) -> bool:
    return name.endswith(_A)


def is_lora_b(name: str) -> bool:
    return name.endswith(_B)


def with_zero_b(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every lora_B zero: the adapter under which the model is its base model."""
    return {k: (v * 0 if is_lora_b(k) else v) for k, v in state.items()}


def target_regex(targets: list[str]) -> str:
    """Full-name regex for the target projections, excluding any vision module."""
    alts = "|".join(re.escape(t) for t in targets)
    return rf"^(?!.*(?:visual|vision)).*\.(?:{alts})$"


def peft_lora_config(cfg: LoraSettings, base_model_name: str = "") -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_regex(cfg.targets),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name or None,
    )


def attach_lora(model: Any, cfg: LoraSettings, *, base_model_name: str = "") -> Any:
    """Wrap a frozen base model with a LoRA adapter; only LoRA tensors are trainable."""
    from peft import get_peft_model

    # PEFT's own error for this case names neither the setting nor what would match.
    regex = target_regex(cfg.targets)
    if not any(re.fullmatch(regex, name) for name, _ in model.named_modules()):
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "visual" not in n and "vision" not in n
            }
        )
        raise ValueError(
            f"lora.targets={cfg.targets} matched no language-model layer of this model; "
            f"its language-model linear layers are named {linear}"
        )
    peft_model = get_peft_model(model, peft_lora_config(cfg, base_model_name))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    bad = [n for n in trainable if "lora_" not in n or "visual" in n or "vision" in n]
    if bad:
        raise RuntimeError(f"non-LoRA or vision parameters became trainable: {bad[:3]}")
    if not trainable:
        raise RuntimeError(f"lora.targets={cfg.targets} matched no language-model layer of this model")
    return peft_model


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter as ``PEFT key -> fp32 CPU tensor`` (sorted by name)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {k: state[k].detach().to("cpu", torch.float32).clone() for k in sorted(state)}


def load_adapter_state(peft_model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's adapter; names and shapes must match exactly."""
    current = adapter_state(peft_model)
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"adapter does not match the model: missing {missing[:2]} unexpected {unexpected[:2]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    # Check every shape before copying anything: a rejected adapter leaves the model as it was.
    for name, value in state.items():
        if tuple(value.shape) != tuple(current[name].shape):
            raise ValueError(f"adapter tensor {name} has shape {tuple(value.shape)}, model expects {tuple(current[name].shape)}")
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            pname = name.replace(_A, ".lora_A.default.weight").replace(_B, ".lora_B.default.weight")
            params[pname].copy_(value.to(params[pname].device, params[pname].dtype))


def freeze_lora_a(peft_model: Any) -> None:
    """`ffa` mode: A stays at its shared seeded value, only B trains."""
    for name, p in peft_model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)


def adapter_shapes(peft_model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in adapter_state(peft_model).items()}


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_adapter(shapes: Mapping[str, tuple[int, ...]], *, seed: int, b_std: float = 0.0) -> dict[str, torch.Tensor]:
    """Deterministic adapter init, a pure function of (shapes, seed).

    A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's Kaiming-uniform bound with a = sqrt(5)),
    B = 0 (PEFT's default) or N(0, b_std^2). Each tensor has its own generator seeded
    from (seed, name), so the result does not depend on iteration order.
    """
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        gen = torch.Generator().manual_seed(_seed_for(seed, name))
        if is_lora_a(name):
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).float()
        elif is_lora_b(name):
            out[name] = (
                torch.randn(shape, generator=gen, dtype=torch.float64).mul(b_std).float()
                if b_std > 0
                else torch.zeros(shape)
            )
        else:
            raise ValueError(f"not a LoRA tensor name: {name}")
    return out


def save_peft_folder(folder: str | Path, state: Mapping[str, torch.Tensor], cfg: LoraSettings, *, base_model_name: str) -> Path:
    """Write a standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = peft_lora_config(cfg, base_model_name).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def read_peft_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter folder, as fp32 CPU tensors."""
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a PEFT adapter folder")
    return {k: v.float() for k, v in sorted(load_file(str(path)).items())}
