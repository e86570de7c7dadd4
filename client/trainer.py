"""One hospital's local DRPO training and evaluation (no Flower in here).

A local step: pick records (uniformly, or by Poisson sampling of privacy units under DP),
sample K responses per record, score them, turn rewards into GRPO/DRPO advantages, and
update the LoRA adapter with token-level PPO-clip (+ KL to the reference policy, the adapter
the run started from).
Under DP the update is DP-SGD over whole units (client/dp_step.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from client.dp_step import DPSettings, DPUpdater
from common.advantages import (
    DRPOState,
    domain_temperatures,
    drpo_advantages,
    fallback_temperature,
    grpo_advantages,
)
from common.answer_prior import answer_counts, first_token_bias, option_prior
from common.climb.errors import MediaError
from common.climb.images import load_mask
from common.climb.inputs import load_visuals
from common.climb.limits import bounds_for
from common.climb.records import Record
from common.climb.validate import usable_records
from common.config import FedClimbConfig
from common.metrics import balanced_accuracy, class_recalls, count_classes, macro_f1
from common.modeling.lora import adapter_shapes, init_adapter, read_peft_folder
from common.modeling.policy import Policy, Rollouts
from common.modeling.prompts import EncodedPrompt, encode_prompt
from common.policy_loss import low_var_kl, ppo_token_losses, reduce_token_mean
from common.rewards import RewardBreakdown, RewardWeights, total_reward, true_label_set
from common.seeding import derive_seed

log = logging.getLogger(__name__)

__all__ = ["DomainStats", "StepLog", "LocalResult", "EvalResult", "LocalTrainer", "privacy_units", "resume_moments",
           "saved_moments"]


@dataclass
class DomainStats:
    """What one domain contributed to a round (counts of prompts and rollouts)."""

    records: int = 0
    rollouts: int = 0
    reward_sum: float = 0.0
    accuracy_sum: float = 0.0

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rollouts if self.rollouts else 0.0

    @property
    def mean_accuracy(self) -> float:
        return self.accuracy_sum / self.rollouts if self.rollouts else 0.0


@dataclass
class StepLog:
    step: int
    prompts: int
    reward: float
    accuracy: float
    rollout_s: float
    update_s: float
    pg_loss: float = 0.0
    kl: float = 0.0
    clipped_units: int = 0


@dataclass
class LocalResult:
    """What a round of local training produced."""

    adapter: dict[str, torch.Tensor]
    steps: int
    domain_stats: dict[str, DomainStats]
    rollout_s: float
    update_s: float
    history: list[StepLog] = field(default_factory=list)
    drpo_state: dict[str, Any] | None = None
    dp_steps: int = 0
    # The privacy units (lists of record indices) the round sampled from.
    units: list[list[int]] = field(default_factory=list)
    # AdamW's moments after the round (``train.keep_optimizer``); stays at the hospital.
    optimizer_state: dict[str, Any] | None = None

    @property
    def prompts(self) -> int:
        """Prompts processed (counting repeats): 0 for a round of empty Poisson batches."""
        return sum(s.records for s in self.domain_stats.values())

    @property
    def mean_reward(self) -> float:
        n = sum(s.rollouts for s in self.domain_stats.values())
        return sum(s.reward_sum for s in self.domain_stats.values()) / n if n else 0.0


@dataclass
class DomainEval:
    records: int
    balanced_accuracy: float
    macro_f1: float
    mean_iou: float
    format_rate: float
    mean_reward: float
    accuracy: float
    predictions: dict[str, int] = field(default_factory=dict)
    recalls: dict[str, float] = field(default_factory=dict)  # per true class


@dataclass
class EvalResult:
    domains: dict[str, DomainEval]
    seconds: float


def privacy_units(records: Sequence[Record], unit: str) -> list[list[int]]:
    """Group record indices into privacy units: each record, or each patient's records."""
    if unit == "record":
        return [[i] for i in range(len(records))]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        key = f"patient:{r.patient_id}" if r.patient_id is not None else f"record:{r.id}"
        groups.setdefault(key, []).append(i)
    return [groups[k] for k in sorted(groups)]


def saved_moments(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's per-parameter state (step, exp_avg, exp_avg_sq), copied to the CPU."""
    state = optimizer.state_dict()["state"]
    return {"state": {int(i): {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                               for k, v in s.items()} for i, s in state.items()}}


def resume_moments(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load :func:`saved_moments` into a fresh ``optimizer`` with this round's hyper-parameters.

    Only the per-parameter state is taken (not the saved learning rate). Raises
    ``ValueError`` when it does not fit the parameters (another model or LoRA setting).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(state, dict) or set(state) != set(range(len(params))):
        raise ValueError(f"saved optimizer state does not hold one entry per trainable parameter ({len(params)})")
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[i].get(key)
            if not isinstance(t, torch.Tensor) or t.shape != p.shape or not torch.isfinite(t).all():
                raise ValueError(f"saved optimizer state for parameter {i}: {key} does not fit shape {tuple(p.shape)}")
    # Copies: torch keeps the given tensors as the optimizer's own and updates them in place.
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for i, s in state.items()}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _cache_key(record: Record) -> tuple[str, str]:
    """What the prompt and mask caches are keyed by: a record id names a place in its root
    (``file:line``), so two roots (every simulated hospital, a pooled scorer) repeat ids."""
    return record.root, record.id


class LocalTrainer:
    """Runs local DRPO steps and evaluation for one hospital on one policy."""

    def __init__(self, policy: Policy, cfg: FedClimbConfig) -> None:
        self.policy = policy
        self.cfg = cfg
        self._prompts: OrderedDict[tuple[str, str], EncodedPrompt] = OrderedDict()
        self._masks: dict[tuple[str, str], np.ndarray] = {}
        self.weights = RewardWeights(accuracy=cfg.reward.accuracy, iou=cfg.reward.iou, format=cfg.reward.format)
        self._dp_updater: DPUpdater | None = None
        self._start: tuple[tuple[str, int, float], dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------------ inputs

    def encode(self, record: Record) -> EncodedPrompt:
        """The record's encoded prompt (decoded media cached, least recently used first out)."""
        key = _cache_key(record)
        hit = self._prompts.get(key)
        if hit is not None:
            self._prompts.move_to_end(key)
            return hit
        visuals = load_visuals(record, video_frames=self.cfg.data.video_frames, ecg_px_per_mm=self.cfg.data.ecg_px_per_mm,
                               bounds=bounds_for(self.cfg.data))
        hit = encode_prompt(self.policy.bundle, record, visuals, self.cfg.prompt)
        self._prompts[key] = hit
        while len(self._prompts) > self.cfg.data.prompt_cache:
            self._prompts.popitem(last=False)
        return hit

    def usable(self, records: Sequence[Record]) -> list[Record]:
        """Records that pass `data validate`'s media checks and encode within data.max_prompt_tokens.

        Run when the data is loaded, so no record can fail (or be refused) when first sampled
        in a round; the others are logged once with their reason and left out.
        """
        data = self.cfg.data
        ok = []
        for r in usable_records(records, video_frames=data.video_frames, bounds=bounds_for(data),
                                max_images=data.max_images):
            try:
                tokens = len(self.encode(r).input_ids)
            except (MediaError, ValueError) as exc:
                log.warning("leaving out %s: %s", r.id, exc)
                continue
            if tokens > data.max_prompt_tokens:
                self._prompts.pop(_cache_key(r), None)
                log.warning("leaving out %s: prompt of %d tokens is longer than data.max_prompt_tokens=%d",
                            r.id, tokens, data.max_prompt_tokens)
                continue
            ok.append(r)
        return ok

    def mask_for(self, record: Record) -> np.ndarray | None:
        if record.segmentation is None:
            return None
        key = _cache_key(record)
        hit = self._masks.get(key)
        if hit is None:  # the bounded loader `data validate` and load-time checks use
            hit = load_mask(record.media_path(record.segmentation), bounds=bounds_for(self.cfg.data, record.roots))
            self._masks[key] = hit
        return hit

    def score(self, record: Record, text: str) -> RewardBreakdown:
        """The response's reward; localisation targets are moved into the model's image frame."""
        boxes, mask = list(record.bboxes) or None, self.mask_for(record)
        frame = self.encode(record).box_frame if (boxes or mask is not None) else None
        if frame is not None:
            ow, oh, mw, mh = frame
            if boxes:
                sx, sy = mw / ow, mh / oh
                boxes = [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in boxes]
            if mask is not None and mask.shape != (mh, mw):
                from PIL import Image

                mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((mw, mh), Image.NEAREST)) > 0
        return total_reward(
            text,
            true_labels=record.answers,
            options=record.options,
            target_boxes=boxes,
            target_mask=mask,
            expect_boxes=record.has_localisation,
            weights=self.weights,
            iou_reduce=self.cfg.reward.iou_reduce,
            no_target=self.cfg.reward.no_target,
        )

    # ------------------------------------------------------------------ training

    def _advantages(
        self,
        rewards: torch.Tensor,
        domains: list[str],
        state: DRPOState | None,
        kl: torch.Tensor | None,
        global_stats: dict[str, tuple[float, float]] | None,
        dp: bool,
    ) -> tuple[torch.Tensor, DRPOState | None]:
        a = self.cfg.advantage
        if a.estimator == "grpo":
            return grpo_advantages(rewards, eps=a.eps), state
        # With stats, every batch domain gets a federation temperature: a domain the server
        # has none for yet gets their mean (common.advantages.fallback_temperature).
        stats = global_stats if (a.global_domain_stats or dp) else None
        options: dict[str, Any] = dict(
            eps=a.eps,
            history=a.history,
            domain_mean=a.domain_mean,
            cluster_eps_clamp=a.cluster_eps_clamp,
            clustering=a.clustering,
            k_max=a.k_max,
            tol=a.elbow_tol,
            kl_damping=a.kl_damping and kl is not None,
            kl=kl,
            kl_quantile=a.kl_quantile,
            restandardize=a.restandardize,
            mu_floor=a.mu_floor,
            min_cluster_size=a.min_cluster_size,
            domain_stats=stats,
        )
        if dp:
            # Every factor must depend on this record alone or on DP-released values
            # (docs/privacy.md, "DRPO under differential privacy").
            use_server = self.cfg.privacy.domain_temperature == "server" and bool(stats)
            options.update(
                clustering=False,
                restandardize=False,
                kl_damping=False,
                kl=None,
                history="step",
                domain_stats=stats if use_server else None,
                fixed_temperature=not use_server,
            )
        adv, state = drpo_advantages(rewards, domains, state, **options)
        if dp and options["domain_stats"]:
            # Without batch re-standardisation the advantages shrink by 1/T_d; rescale by
            # the mean federation temperature (a function of broadcast, DP-released
            # values only) so that rarity stays relative and the scale stays ~1.
            temps = domain_temperatures(options["domain_stats"], mu_floor=a.mu_floor)
            adv = adv * fallback_temperature(temps.values())
        return adv, state

    def train(
        self,
        records: Sequence[Record],
        *,
        steps: int,
        seed: int,
        dp: DPSettings | None = None,
        global_domain_stats: dict[str, tuple[float, float]] | None = None,
        drpo_state: dict[str, Any] | None = None,
        optimizer_state: dict[str, Any] | None = None,
        progress: bool = False,
        on_step: Callable[[StepLog], None] | None = None,
    ) -> LocalResult:
        """Run ``steps`` local DRPO steps; returns the new adapter and statistics.

        ``optimizer_state`` (a previous round's ``LocalResult.optimizer_state``) resumes
        AdamW's moments and step count instead of starting them at zero; the learning
        rate and the other hyper-parameters are this round's. A state that does not fit
        the trainable parameters is ignored with a warning.
        """
        cfg = self.cfg
        records = list(records)
        if not records:
            raise ValueError("no usable training records")
        policy = self.policy
        params = policy.trainable_parameters()
        optimizer = torch.optim.AdamW(
            params, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), weight_decay=cfg.train.weight_decay
        )
        if optimizer_state is not None:
            try:
                resume_moments(optimizer, optimizer_state)
            except ValueError as exc:  # another model or LoRA setting: the moments are only a head start
                log.warning("%s; starting AdamW's moments at zero", exc)
        rng = np.random.default_rng(derive_seed(seed, "batches"))
        state = DRPOState.from_json(drpo_state) if drpo_state else None
        units = privacy_units(records, dp.unit if dp else "record")
        if self._needs_reference(dp=dp is not None):
            policy.set_reference(self._start_adapter())
        if dp is not None and self._dp_updater is None:
            self._dp_updater = DPUpdater.for_policy(policy)
        prior = None
        if cfg.train.logit_adjustment > 0:
            if dp is not None:  # also refused by the configuration
                raise ValueError("train.logit_adjustment needs privacy off: the answer prior counts every record")
            prior = answer_counts((r.domain, r.answers) for r in records)
        stats: dict[str, DomainStats] = {}
        history: list[StepLog] = []
        order: list[int] = []
        t_roll = t_upd = 0.0

        bar = _progress(steps, progress)
        for step in range(steps):
            # --- choose units --------------------------------------------------------
            if dp is not None:
                chosen_units = self._dp_updater.sample_units(len(units), dp)  # type: ignore[union-attr]
            else:
                chosen_units, order = _next_batch(order, cfg.rollout.batch_prompts, len(units), rng)
            batch = [(u, i) for u in chosen_units for i in units[u]]
            t0 = time.perf_counter()
            log_entry = StepLog(step=step, prompts=len(batch), reward=0.0, accuracy=0.0, rollout_s=0.0, update_s=0.0)
            if batch:
                recs = [records[i] for _, i in batch]
                rollouts = policy.generate(
                    [self.encode(r) for r in recs],
                    num_rollouts=cfg.rollout.num_rollouts,
                    temperature=cfg.rollout.temperature,
                    max_new_tokens=cfg.rollout.max_new_tokens,
                    seed=derive_seed(_rollout_base(seed, dp), "rollout", step),
                    first_bias=self._first_bias(recs, prior) if prior is not None else None,
                )
                K = cfg.rollout.num_rollouts
                scored = [self.score(recs[int(rollouts.prompt_index[j])], t) for j, t in enumerate(rollouts.texts)]
                rewards = torch.tensor([s.total for s in scored], dtype=torch.float32).view(len(recs), K)
                accs = torch.tensor([s.accuracy for s in scored], dtype=torch.float32).view(len(recs), K)
                for r, rew, acc in zip(recs, rewards, accs, strict=True):
                    d = stats.setdefault(r.domain, DomainStats())
                    d.records += 1
                    d.rollouts += K
                    d.reward_sum += float(rew.sum())
                    d.accuracy_sum += float(acc.sum())
                start_logp, ref_logp = self._reference_logprobs(rollouts, dp=dp is not None)
                kl = None
                if ref_logp is not None and start_logp is not None:
                    per_row = (low_var_kl(start_logp, ref_logp) * rollouts.mask).sum(1)
                    kl = per_row.view(len(recs), K).sum(1)
                adv, state = self._advantages(
                    rewards, [r.domain for r in recs], state, kl, global_domain_stats, dp is not None
                )
                t1 = time.perf_counter()
                unit_of_prompt = [u for u, _ in batch]
                try:
                    loss_stats = self._update(
                        rollouts, adv.flatten(), ref_logp, optimizer, dp, unit_of_prompt, len(units)
                    )
                except BaseException:
                    if dp is not None:
                        self._dp_updater.abort()  # type: ignore[union-attr]
                    raise
                t2 = time.perf_counter()
                log_entry.reward, log_entry.accuracy = float(rewards.mean()), float(accs.mean())
                log_entry.rollout_s, log_entry.update_s = t1 - t0, t2 - t1
                log_entry.pg_loss, log_entry.kl, log_entry.clipped_units = loss_stats
                t_roll += t1 - t0
                t_upd += t2 - t1
            elif dp is not None:  # empty Poisson batch: the noisy steps still happen
                t1 = time.perf_counter()
                # As many noisy updates as a non-empty sample gets (one per PPO epoch),
                # so that the mechanism is the accounted (sigma / sqrt(E), q, 1) step.
                for _epoch in range(cfg.train.ppo_epochs):
                    self._dp_updater.empty_step(optimizer, dp)  # type: ignore[union-attr]
                t_upd += time.perf_counter() - t1
            history.append(log_entry)
            if on_step:
                on_step(log_entry)
            bar.set_postfix(reward=f"{log_entry.reward:.3f}", acc=f"{log_entry.accuracy:.2f}")
            bar.update(1)
        bar.close()
        return LocalResult(
            adapter=policy.get_adapter(),
            steps=steps,
            domain_stats=stats,
            rollout_s=t_roll,
            update_s=t_upd,
            history=history,
            drpo_state=state.to_json() if state is not None else None,
            dp_steps=steps if dp is not None else 0,
            units=units,
            optimizer_state=saved_moments(optimizer) if cfg.train.keep_optimizer else None,
        )

    def _first_bias(self, recs: Sequence[Record], prior: dict[str, Any]) -> list[dict[int, float]]:
        """Each record's logit adjustment from this hospital's answer prior (common/answer_prior.py).

        The configuration asks for constrained answers, under which a record without options
        is left out when the data is loaded (:meth:`usable`), so every record has options here.
        """
        tau = self.cfg.train.logit_adjustment
        return [first_token_bias(self.encode(r).answer_sequences or [], option_prior(prior.get(r.domain, {}), r.options),
                                 tau) for r in recs]

    def _damping(self, *, dp: bool) -> bool:
        a = self.cfg.advantage
        return a.estimator == "drpo" and a.kl_damping and not dp

    def _needs_reference(self, *, dp: bool) -> bool:
        """Whether anything uses the reference policy (the KL penalty or DRPO's damping)."""
        return self.cfg.train.kl_coef > 0 or self._damping(dp=dp)

    def _start_adapter(self) -> dict[str, torch.Tensor]:
        """The adapter the run started from: the KL reference (read once per setting)."""
        cfg = self.cfg
        key = (cfg.server.init_adapter, cfg.lora.init_seed, cfg.lora.init_b_std)
        if self._start is None or self._start[0] != key:
            self._start = (key, start_adapter(cfg, adapter_shapes(self.policy.peft)))
        return self._start[1]

    def _reference_logprobs(self, rollouts: Rollouts, *, dp: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The policy's and the reference's log-probs before the update (no grad), if needed.

        The policy's are only for DRPO's KL damping (the PPO ratio's old log-probs come
        from the training pass itself, see :meth:`_update`); the reference's for the KL
        penalty and the damping.
        """
        cfg = self.cfg
        damping = self._damping(dp=dp)
        need_ref = self._needs_reference(dp=dp)
        need_old = damping
        old: list[torch.Tensor] = []
        ref: list[torch.Tensor] = []
        if not (need_old or need_ref):
            return None, None
        rows = list(range(rollouts.num_rows))
        self.policy.peft.eval()
        with torch.no_grad():
            for chunk in _chunks(rows, cfg.train.micro_batch * cfg.rollout.num_rollouts):
                unique, inverse = unique_rows(rollouts, chunk)  # identical rows scored once
                if need_old:
                    old.append(self.policy.token_logprobs(rollouts, unique, temperature=cfg.rollout.temperature)
                               .cpu()[inverse])
                if need_ref:
                    ref.append(self.policy.token_logprobs(rollouts, unique, temperature=cfg.rollout.temperature,
                                                          adapter=False).cpu()[inverse])
        return (torch.cat(old) if old else None), (torch.cat(ref) if ref else None)

    def _update(
        self,
        rollouts: Rollouts,
        advantages: torch.Tensor,
        ref_logp: torch.Tensor | None,
        optimizer: torch.optim.Optimizer,
        dp: DPSettings | None,
        unit_of_prompt: list[int],
        num_units_total: int,
    ) -> tuple[float, float, int]:
        cfg = self.cfg
        policy = self.policy
        K = cfg.rollout.num_rollouts
        policy.peft.train()
        mask_all = rollouts.mask
        total_tokens = float(mask_all.sum())
        # Micro-batches never split a unit: group prompt indices by unit.
        prompt_groups: dict[int, list[int]] = {}
        for p, u in enumerate(unit_of_prompt):
            prompt_groups.setdefault(u, []).append(p)
        groups = list(prompt_groups.values())
        pg_sum = kl_sum = 0.0
        n_loss = 0
        clipped = 0
        # PPO's old log-probs are the first epoch's own training pass, detached: the same
        # mode (LoRA dropout), batch and padding as the pass they divide, so the first
        # epoch's ratio is exactly 1 (a separate eval-mode pass is not). The optimizer
        # steps once per epoch, so every row of epoch 0 sees the pre-update weights.
        old_logp = torch.zeros_like(mask_all) if cfg.train.ppo_epochs > 1 else None  # (R, T)
        for epoch in range(cfg.train.ppo_epochs):
            optimizer.zero_grad(set_to_none=True)
            if dp is not None:
                self._dp_updater.begin_step(dp)  # type: ignore[union-attr]
            for mb in _chunks(groups, cfg.train.micro_batch):
                prompts = [p for g in mb for p in g]
                rows = [p * K + k for p in prompts for k in range(K)]
                dev = policy.bundle.device
                module = self._dp_updater.module if dp is not None else None  # type: ignore[union-attr]
                entropy = None
                # Identical rollouts of one prompt (frequent when answers are constrained to a
                # few options) are scored once; gathering the rows back makes autograd sum
                # their gradients, so the update is exactly the one over every row.
                unique, inverse = unique_rows(rollouts, rows)
                if cfg.train.entropy_coef > 0:
                    logp, entropy = policy.token_logprobs(
                        rollouts, unique, temperature=cfg.rollout.temperature, module=module, with_entropy=True
                    )
                    entropy = entropy[inverse]
                else:
                    logp = policy.token_logprobs(rollouts, unique, temperature=cfg.rollout.temperature, module=module)
                logp = logp[inverse]
                mask = mask_all[rows].to(dev)
                if epoch == 0:
                    old = logp.detach()
                    if old_logp is not None:
                        old_logp[rows] = old.to(old_logp.device, old_logp.dtype)
                else:
                    old = old_logp[rows].to(dev)  # type: ignore[index]
                ref = ref_logp[rows].to(dev) if ref_logp is not None else None
                losses, st = ppo_token_losses(
                    logp, old, ref, advantages[rows].to(dev), mask,
                    clip_low=cfg.train.clip_low, clip_high=cfg.train.clip_high,
                    dual_clip=cfg.train.dual_clip, kl_coef=cfg.train.kl_coef,
                    entropy=entropy, entropy_coef=cfg.train.entropy_coef,
                )
                pg_sum += st.pg_loss
                kl_sum += st.kl
                n_loss += 1
                if dp is None:
                    reduce_token_mean(losses, mask, total_tokens=total_tokens).backward()
                else:
                    unit_local = torch.tensor([i for i, g in enumerate(mb) for p in g for _ in range(K)], device=dev)
                    # The per-sample gradients are per scored (unique) row: each belongs to
                    # the unit of the rows it stands for (one prompt, so one unit).
                    self._dp_updater.accumulate(  # type: ignore[union-attr]
                        losses, mask, unit_local, len(mb), dp, grad_unit_index=unit_local[inverse_first(inverse)]
                    )
            if dp is None:
                if cfg.train.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), cfg.train.max_grad_norm)
                optimizer.step()
            else:
                clipped += self._dp_updater.finish_step(optimizer, dp)  # type: ignore[union-attr]
        policy.peft.eval()
        return pg_sum / max(n_loss, 1), kl_sum / max(n_loss, 1), clipped

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _in_eval_batches(self, records: Sequence[Record], progress: bool,
                         fn: Callable[[int, list[Record]], list[Any]]) -> list[Any]:
        """``fn(i, batch)`` over batches of ``rollout.eval_batch_prompts`` records, results in order."""
        out: list[Any] = []
        records = list(records)
        bar = _progress(len(records), progress)
        for i, chunk in enumerate(_chunks(records, self.cfg.rollout.eval_batch_prompts)):
            out += fn(i, chunk)
            bar.update(len(chunk))
        bar.close()
        return out

    def answers(self, records: Sequence[Record], *, seed: int, progress: bool = False) -> list[Answer]:
        """Greedy (or eval-temperature) answers on held-out records, one per record, scored."""
        cfg = self.cfg

        def batch(i: int, chunk: list[Record]) -> list[Answer]:
            rollouts = self.policy.generate(
                [self.encode(r) for r in chunk],
                num_rollouts=1,
                temperature=cfg.rollout.eval_temperature,
                max_new_tokens=cfg.rollout.max_new_tokens,
                seed=derive_seed(seed, "eval", i),
            )
            scores = [(r, text, self.score(r, text)) for r, text in zip(chunk, rollouts.texts, strict=True)]
            # The labels the accuracy reward read: evaluation and reward agree.
            return [Answer(r, text, score.predicted or frozenset(), score) for r, text, score in scores]

        return self._in_eval_batches(records, progress, batch)

    def option_logprobs(self, records: Sequence[Record], *, progress: bool = False) -> list[list[float]]:
        """log p(option) of each record's answer options under the current adapter (constrained prompts only).

        At temperature 1, in the record's option order (:meth:`Policy.option_logprobs`).
        """
        return self._in_eval_batches(records, progress,
                                     lambda _i, chunk: self.policy.option_logprobs([self.encode(r) for r in chunk]))

    def evaluate(self, records: Sequence[Record], *, seed: int, progress: bool = False) -> EvalResult:
        """Metrics per domain of :meth:`answers` on held-out records."""
        t0 = time.perf_counter()
        return EvalResult(summarise(self.answers(records, seed=seed, progress=progress)), time.perf_counter() - t0)


@dataclass
class Answer:
    """One evaluated record: the model's text, the labels it answered, and their reward."""

    record: Record
    text: str
    predicted: frozenset[str]
    score: Any


def truth_labels(record: Record) -> frozenset[str]:
    """The record's answer as a label set, exactly as the accuracy reward reads it."""
    return true_label_set(record.answers, options=record.options)


def summarise(answers: Sequence[Answer]) -> dict[str, DomainEval]:
    """Per-domain metrics of scored answers."""
    by_domain: dict[str, list[Answer]] = {}
    for a in answers:
        by_domain.setdefault(a.record.domain, []).append(a)
    out: dict[str, DomainEval] = {}
    for domain, items in sorted(by_domain.items()):
        truth = [truth_labels(a.record) for a in items]
        preds = [a.predicted for a in items]
        counts = count_classes(truth, preds)
        ious = [a.score.iou for a in items if a.score.iou is not None]
        histogram: dict[str, int] = {}
        for p in preds:
            key = ", ".join(sorted(p)) or "(none)"
            histogram[key] = histogram.get(key, 0) + 1
        out[domain] = DomainEval(
            records=len(items),
            balanced_accuracy=balanced_accuracy(counts),
            macro_f1=macro_f1(counts),
            mean_iou=float(np.mean(ious)) if ious else 0.0,
            format_rate=float(np.mean([a.score.format >= 1.0 - 1e-9 for a in items])),
            mean_reward=float(np.mean([a.score.total for a in items])),
            accuracy=float(np.mean([a.score.accuracy for a in items])),
            predictions=histogram,
            recalls=class_recalls(counts),
        )
    return out


def start_adapter(cfg: FedClimbConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The adapter a run starts from, as the server's first round sends it.

    ``server.init_adapter`` (a PEFT folder) when set, else the seeded init every party
    computes alike (server.federation.initial_adapter makes the same choice).
    """
    if cfg.server.init_adapter:
        try:
            return read_peft_folder(cfg.server.init_adapter)
        except OSError as exc:
            raise ValueError(
                f"server.init_adapter={cfg.server.init_adapter!r}: {exc}. The KL penalty and DRPO's damping pull "
                "toward the adapter the run started from, so this hospital needs a copy of that PEFT folder at "
                "the same path (or the run must set train.kl_coef=0 and advantage.kl_damping=false)"
            ) from exc
    return init_adapter(shapes, seed=cfg.lora.init_seed, b_std=cfg.lora.init_b_std)


def _next_batch(order: list[int], size: int, n: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """The next ``size`` indices of a shuffled epoch order, refilled without repeats in a batch."""
    batch = order[:size]
    rest = order[size:]
    if len(batch) < size:
        taken = set(batch)
        fresh = [i for i in rng.permutation(n).tolist() if i not in taken]
        need = min(size, n) - len(batch)
        batch += fresh[:need]
        rest = fresh[need:]
    return batch, rest


def unique_rows(rollouts: Rollouts, rows: Sequence[int]) -> tuple[list[int], torch.Tensor]:
    """The distinct rows among ``rows`` (same prompt and same response tokens) and, for each
    of ``rows``, the position of its representative in that list (``[len(rows)]`` long)."""
    seen: dict[tuple[int, tuple[int, ...]], int] = {}
    unique: list[int] = []
    inverse: list[int] = []
    for r in rows:
        m = rollouts.mask[r] > 0
        key = (int(rollouts.prompt_index[r]), tuple(rollouts.responses[r][m].tolist()))
        if key not in seen:
            seen[key] = len(unique)
            unique.append(r)
        inverse.append(seen[key])
    return unique, torch.tensor(inverse, dtype=torch.long)


def inverse_first(inverse: torch.Tensor) -> torch.Tensor:
    """For each distinct row (0..max(inverse)), the first position of ``inverse`` that maps to it."""
    first = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long)
    for pos in range(len(inverse) - 1, -1, -1):
        first[inverse[pos]] = pos
    return first


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    size = max(1, int(size))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _rollout_base(seed: int, dp: DPSettings | None) -> int:
    """The base of the rollout seeds: the hospital's secret one under DP with a secure RNG."""
    if dp is not None and dp.rollout_seed is not None:
        return dp.rollout_seed
    return seed


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, leave=False, dynamic_ncols=True)

