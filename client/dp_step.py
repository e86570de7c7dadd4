"""DP-SGD over privacy units for the LoRA parameters (exact per-unit gradients).

Per-row gradients come from Opacus's GradSampleModule (hooks on the LoRA linears only;
the vision tower is frozen). Rows are summed into units (a record with its K rollouts,
or a patient's records), each unit's gradient is clipped to C, the clipped gradients are
summed over the micro-batches of the step, N(0, sigma^2 C^2) is added once, and the
result is divided by the expected batch size q * N (Poisson sampling).
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.policy_loss import reduce_per_unit
from common.privacy.dpsgd import clip_and_noise, group_rows_to_units, poisson_sample
from common.privacy.noise import NoiseSource

__all__ = ["DPSettings", "DPUpdater"]

log = logging.getLogger(__name__)


@dataclass
class DPSettings:
    """The mechanism of one round, resolved by the client from the hospital's budget."""

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    unit: str
    # Draws the Poisson samples and the noise (ChaCha20, common/privacy/noise.py); by
    # default keyed from os.urandom (a fixed or guessable key would let the server
    # recompute and subtract the noise).
    generator: NoiseSource = field(default_factory=NoiseSource.secure)
    # Seeds the rollouts' sampling (and anything else on torch's global RNG in the step).
    # It must be secret too: with a seed the server knows, adding one unit to the batch
    # shifts the random draws of every unit after it, so other units' gradients would
    # depend on it. None = derive from the run seed (simulations with secure_rng off).
    rollout_seed: int | None = None
    # The divisor of the noisy sum: q * N with N public or DP-released (rounds pass
    # client/privacy_round.py's; the exact N would reveal itself through the update).
    # None = q * the exact number of units, for direct calls of the trainer only.
    expected_batch_size: float | None = None


_UPDATERS: "weakref.WeakKeyDictionary[Any, DPUpdater]" = weakref.WeakKeyDictionary()


class _DrawnAhead:
    """Stands in for the step's NoiseSource in ``clip_and_noise``: hands out the one
    standard-normal draw made while the step's forward and backward ran."""

    def __init__(self, values: np.ndarray) -> None:
        self._values: np.ndarray | None = values

    def standard_normal(self, size: int | tuple[int, ...]) -> np.ndarray:
        shape = (size,) if isinstance(size, int) else tuple(size)
        values, self._values = self._values, None
        if values is None or values.size != math.prod(shape):
            raise RuntimeError(f"the noise drawn ahead does not fit the step's {math.prod(shape)} values")
        return values.reshape(shape)


class DPUpdater:
    """Accumulates clipped per-unit gradients over micro-batches and takes the noisy step."""

    @classmethod
    def for_policy(cls, policy: Any) -> DPUpdater:
        """The one updater of ``policy`` (its hooks must be registered exactly once)."""
        updater = _UPDATERS.get(policy)
        if updater is None:
            updater = cls(policy)
            _UPDATERS[policy] = updater
        return updater

    def __init__(self, policy: Any) -> None:
        from opacus import GradSampleModule

        self.params = policy.trainable_parameters()
        model = policy.bundle.model
        if getattr(model, "is_gradient_checkpointing", False):
            # Opacus fills per-row gradients only when every forward of a layer got its
            # backward; checkpointing runs each forward twice (once more inside backward),
            # so no per-row gradient would ever appear. DP trades the memory for exactness.
            model.gradient_checkpointing_disable()
            log.warning("DP-SGD: gradient checkpointing turned off (per-row gradients need one forward per "
                        "backward); activations now take more memory")
        self.module = GradSampleModule(policy.peft, batch_first=True, loss_reduction="sum", strict=True)
        # The hooks live on the policy's own LoRA layers, so they would also fire in
        # non-DP training of the same policy (and pile up per-row gradients there that
        # nothing clears): they are on only between begin_step and finish_step.
        self.module.disable_hooks()
        self._sum: list[torch.Tensor] = []
        self._clipped = 0
        self._num_units = 0
        #: Units whose gradient was not finite (NaN/inf) and so contributed zero, over
        #: this updater's life. A local diagnostic: it is logged, never sent.
        self.nonfinite_units = 0
        #: Draw the step's noise on a background thread while its forward and backward
        #: run (the draw does not depend on the gradients). The same generator makes the
        #: same draw in the same order, so the step is bit for bit the one drawn inline.
        self.draw_ahead = True
        self._executor: ThreadPoolExecutor | None = None
        self._noise: Future[np.ndarray] | None = None

    def sample_units(self, num_units: int, dp: DPSettings) -> list[int]:
        """Poisson sampling: each unit independently with probability q."""
        self._num_units = num_units
        chosen = poisson_sample(num_units, dp.sample_rate, dp.generator).tolist()
        return chosen

    def abort(self) -> None:
        """Undo a step that failed between forward and backward (e.g. out of memory).

        Opacus counts forwards per parameter and only fills ``grad_sample`` when every
        forward got its backward; a step that dies in between would leave every later
        step without per-sample gradients. This puts the module back in a clean state.
        """
        self.module.disable_hooks()
        self._take_noise()  # the draw is spent either way; no other draw may overlap it
        for module in self.module.modules():
            if hasattr(module, "activations"):
                module.activations = []
        for p in self.params:
            p.grad = None
            p.grad_sample = None
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0
        self._sum = []

    def begin_step(self, dp: DPSettings | None = None) -> None:
        """Start a step; with ``dp`` (and ``draw_ahead``) its noise is drawn meanwhile."""
        self._take_noise()
        if dp is not None and self.draw_ahead and dp.noise_multiplier * dp.max_grad_norm > 0:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedclimb-dp-noise")
            total = sum(p.numel() for p in self.params)
            self._noise = self._executor.submit(dp.generator.standard_normal, total)
        self._sum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self._clipped = 0
        for p in self.params:
            p.grad = None
            p.grad_sample = None
        self.module.enable_hooks()

    def accumulate(
        self, losses: torch.Tensor, mask: torch.Tensor, unit_index: torch.Tensor, num_units: int, dp: DPSettings,
        *, grad_unit_index: torch.Tensor | None = None,
    ) -> None:
        """Backward one micro-batch (whole units only) and add its clipped unit gradients.

        ``unit_index`` gives the unit of each loss row; ``grad_unit_index`` the unit of each
        row the model was run on, when that differs (duplicate rows scored once)."""
        per_row = reduce_per_unit(losses, mask, unit_index, num_units)
        with warnings.catch_warnings():
            # Opacus notes that no *input* needs a gradient (the base model is frozen): expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_row.sum().backward()
        per_row_grads = [p.grad_sample.float() for p in self.params]
        per_unit = group_rows_to_units(per_row_grads, unit_index if grad_unit_index is None else grad_unit_index,
                                       num_units)
        summed, stats = clip_and_noise(
            per_unit, max_grad_norm=dp.max_grad_norm, noise_multiplier=0.0, expected_batch_size=1.0
        )
        for acc, g in zip(self._sum, summed, strict=True):
            acc.add_(g)
        self._clipped += stats.num_clipped
        if stats.num_nonfinite:
            self.nonfinite_units += stats.num_nonfinite
            log.warning(
                "%d privacy unit(s) of this micro-batch had a non-finite (NaN/inf) gradient and "
                "contributed zero to the DP step (%d so far; a local count, never sent)",
                stats.num_nonfinite, self.nonfinite_units,
            )
        for p in self.params:
            p.grad = None
            p.grad_sample = None

    def finish_step(self, optimizer: torch.optim.Optimizer, dp: DPSettings) -> int:
        """Add the noise once, divide by q * N and step. Returns how many units were clipped."""
        self.module.disable_hooks()
        expected = dp.expected_batch_size if dp.expected_batch_size is not None else dp.sample_rate * self._num_units
        if expected <= 0:
            raise ValueError(f"expected batch size q*N = {dp.sample_rate}*{self._num_units} must be > 0")
        ahead = self._take_noise()
        noise, _ = clip_and_noise(
            [torch.zeros((0, *g.shape)) for g in self._sum],
            max_grad_norm=dp.max_grad_norm,
            noise_multiplier=dp.noise_multiplier,
            expected_batch_size=expected,
            noise=_DrawnAhead(ahead) if ahead is not None else dp.generator,  # type: ignore[arg-type]
        )
        for p, s, n in zip(self.params, self._sum, noise, strict=True):
            p.grad = (s / expected + n.to(s.device)).to(p.dtype)
        optimizer.step()
        return self._clipped

    def _take_noise(self) -> np.ndarray | None:
        """The noise drawn ahead for this step (waiting for it), or None."""
        future, self._noise = self._noise, None
        return future.result() if future is not None else None

    def empty_step(self, optimizer: torch.optim.Optimizer, dp: DPSettings) -> None:
        """An empty Poisson batch still releases a (pure-noise) step."""
        self.begin_step(dp)
        self.finish_step(optimizer, dp)
