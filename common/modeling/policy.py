"""The trainable policy: a frozen base model plus one LoRA adapter.

Two operations: sample K responses per prompt (batched ``generate`` with the KV cache,
optionally constrained to the options), and per-token log-probabilities of given
responses under the policy or the reference policy: the adapter the run started from
(swapped into the same adapter tensors), or the base model with the adapter disabled
when the run started from a zero adapter — never a second copy of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from common.config import LoraSettings
from common.modeling.constrained import ConstrainedLogits, OptionTrie, allowed_mask
from common.modeling.loader import ModelBundle
from common.modeling.lora import (
    adapter_shapes,
    adapter_state,
    attach_lora,
    freeze_lora_a,
    init_adapter,
    is_lora_b,
    load_adapter_state,
)
from common.modeling.prompts import EncodedPrompt, collate_prompts

__all__ = ["Rollouts", "Policy"]


def _param_name(key: str) -> str:
    """The PEFT parameter behind an adapter-state key (``...lora_A.weight``)."""
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


@contextlib.contextmanager
def _checkpoint_defaults_off(model: Any) -> Iterator[None]:
    """Hide the checkpoint's generation config from ``generate`` while it runs.

    transformers fills every field a passed GenerationConfig leaves None from
    ``model.generation_config`` (a checkpoint's ``generation_config.json``: e.g.
    Qwen2.5-VL's repetition_penalty 1.05, top_k 1, top_p 0.001), which would add logits
    processors the scoring pass does not apply. An empty config leaves only the library
    defaults, which change nothing once temperature, top-p and top-k are explicit.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@dataclass
class Rollouts:
    """K sampled responses for each of P prompts (rows grouped by prompt)."""

    prompts: list[EncodedPrompt]
    prompt_index: torch.Tensor  # [R] long: the prompt of each row
    responses: torch.Tensor  # [R, T] long, pad after the end
    mask: torch.Tensor  # [R, T] float: 1 on generated tokens up to and including end-of-turn
    texts: list[str]  # response text, starting with the constrained prefix if any
    # Per prompt, {first answer token: bias} added to its logit when sampled and scored
    # (train.logit_adjustment, common/answer_prior.py); None = no adjustment.
    first_bias: list[dict[int, float] | None] | None = None

    @property
    def num_rows(self) -> int:
        return int(self.responses.shape[0])


class Policy:
    """LoRA policy over a frozen base model."""

    def __init__(self, bundle: ModelBundle, lora: LoraSettings, *, freeze_a: bool = False) -> None:
        self.bundle = bundle
        self.peft = attach_lora(bundle.model, lora)
        # PEFT draws lora_A from the global RNG; start from the shared seeded init instead,
        # the same adapter the server would send (common.modeling.lora.init_adapter).
        load_adapter_state(self.peft, init_adapter(adapter_shapes(self.peft), seed=lora.init_seed, b_std=lora.init_b_std))
        if freeze_a:
            freeze_lora_a(self.peft)
        self.peft.to(bundle.device)
        # Which tensors train is decided here, once. PEFT's disable_adapter() turns
        # requires_grad back on for every adapter tensor when it exits (lora_A included,
        # which would silently break `ffa`), so reference passes restore this set.
        self._trainable = {n for n, p in self.peft.named_parameters() if p.requires_grad}
        # (adapter parameter, its value in the reference adapter); empty = adapter disabled.
        self._reference_weights: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        tok = bundle.tokenizer
        self.pad_id = int(tok.pad_token_id)
        image_token = tok.convert_tokens_to_ids("<|image_pad|>") if bundle.multimodal else None
        self.image_token_id = image_token if isinstance(image_token, int) else None
        self.vocab_size = int(self.peft.get_output_embeddings().weight.shape[0])
        # A response must never contain vision placeholders: the model would look for
        # image features that do not exist (and a random-init model does emit them).
        vision = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
        ids = [tok.convert_tokens_to_ids(t) for t in vision] if bundle.multimodal else []
        self.suppressed = sorted({i for i in ids if isinstance(i, int) and i != tok.unk_token_id})

    # ------------------------------------------------------------------ parameters

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if n in self._trainable]

    def set_reference(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Make ``state`` (an adapter, as :meth:`get_adapter` returns it) the reference policy.

        The KL penalty and DRPO's damping pull toward the reference: the adapter the run
        started from. None, or an adapter whose every ``lora_B`` is zero (it adds nothing
        to the base weights), makes the reference the base model with the adapter
        disabled, which needs no second copy of the adapter.
        """
        if state is None or all(not v.any() for k, v in state.items() if is_lora_b(k)):
            self._reference_weights = []
            return
        shapes = adapter_shapes(self.peft)
        if set(state) != set(shapes) or any(tuple(state[k].shape) != shapes[k] for k in shapes):
            wrong = sorted(set(state) ^ set(shapes)) or [k for k in shapes if tuple(state[k].shape) != shapes[k]]
            raise ValueError(f"the reference adapter does not match the model's adapter (first mismatch: {wrong[0]})")
        params = dict(self.peft.named_parameters())
        self._reference_weights = [
            (params[_param_name(k)], v.to(params[_param_name(k)].device, params[_param_name(k)].dtype))
            for k, v in sorted(state.items())
        ]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy (:meth:`set_reference`): the start adapter, or none at all.

        A start adapter is swapped into the adapter's own tensors for the duration and the
        current values are put back exactly afterwards (no extra PEFT adapter, so Opacus'
        hooks and the adapter state see one adapter only).
        """
        if self._reference_weights:
            with torch.no_grad():
                saved = [p.detach().clone() for p, _ in self._reference_weights]
                for p, value in self._reference_weights:
                    p.copy_(value)
            try:
                yield
            finally:
                with torch.no_grad():
                    for (p, _), value in zip(self._reference_weights, saved, strict=True):
                        p.copy_(value)
            return
        try:
            with self.peft.disable_adapter():
                yield
        finally:
            for n, p in self.peft.named_parameters():
                p.requires_grad_(n in self._trainable)

    def get_adapter(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.peft)

    def set_adapter(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.peft, state)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        dtype = self.bundle.autocast_dtype
        if dtype is None:
            yield
        else:
            with torch.autocast(self.bundle.device.type, dtype=dtype):
                yield

    # ------------------------------------------------------------------ sampling

    def _inputs(self, prompts: Sequence[EncodedPrompt]) -> dict[str, torch.Tensor]:
        batch = collate_prompts(list(prompts), pad_id=self.pad_id, image_token_id=self.image_token_id)
        return {k: v.to(self.bundle.device) for k, v in batch.items()}

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[EncodedPrompt],
        *,
        num_rollouts: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
        first_bias: Sequence[dict[int, float] | None] | None = None,
    ) -> Rollouts:
        """Sample ``num_rollouts`` responses per prompt (temperature 0 = greedy).

        ``first_bias`` (constrained prompts only; one per prompt) adds ``{token: bias}`` to
        the first response token's logits; the rollouts carry it so that
        :meth:`token_logprobs` scores the same adjusted distribution.

        Each token is drawn from exactly the distribution :meth:`token_logprobs` scores:
        ``softmax(logits / temperature)`` with the vision placeholders suppressed and,
        for constrained prompts, every token outside the options masked. There is no
        top-p / top-k truncation and no processor from the checkpoint's generation
        config (repetition penalty, n-gram blocking, bad words, minimum length...):
        the PPO ratio and the KL are only on-policy if the sampler and the scorer agree.
        """
        rows = [p for p in prompts for _ in range(num_rollouts)]
        index = torch.arange(len(prompts)).repeat_interleave(num_rollouts)
        inputs = self._inputs(rows)
        prompt_len = inputs["input_ids"].shape[1]
        processors = []
        constrained = all(p.answer_sequences for p in rows)
        if first_bias is not None:
            if not constrained:
                raise ValueError("a first-token bias needs constrained answers (prompt.constrained=true)")
            if len(first_bias) != len(prompts):
                raise ValueError(f"{len(first_bias)} first-token biases for {len(prompts)} prompts")
        if constrained:
            tries = [OptionTrie(p.answer_sequences or []) for p in rows]
            row_bias = [first_bias[int(i)] for i in index] if first_bias is not None else None
            processors.append(ConstrainedLogits(tries, prompt_len, self.pad_id, row_bias))
            max_new_tokens = max(len(s) for p in rows for s in (p.answer_sequences or []))
        torch.manual_seed(seed)
        gen = self.sampling_config(temperature=temperature, max_new_tokens=max_new_tokens)
        self.peft.eval()
        with self.autocast(), _checkpoint_defaults_off(self.peft.get_base_model()):
            cache = self._shared_prefill(prompts, num_rollouts) if num_rollouts > 1 else None
            out = self.peft.generate(**inputs, generation_config=gen, logits_processor=processors or None,
                                     **({"cache": cache} if cache is not None else {}))
        responses = out[:, prompt_len:].cpu()
        mask = self._response_mask(responses)
        responses = responses.masked_fill(mask == 0, self.pad_id)
        texts = [
            p.response_prefix + self.bundle.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
            for p, r, m in zip(rows, responses, mask, strict=True)
        ]
        return Rollouts(list(prompts), index, responses, mask, texts,
                        list(first_bias) if first_bias is not None else None)

    def _shared_prefill(self, prompts: Sequence[EncodedPrompt], num_rollouts: int) -> Any | None:
        """The key/value cache of each prompt (all but its last token), computed once and
        repeated for its ``num_rollouts`` rows, so that ``generate`` does not run the same
        prompt K times. Text models only (a vision model's positions depend on its images);
        ``None`` means generate prefills as usual."""
        if self.bundle.multimodal:
            return None
        base = self._inputs(list(prompts))
        ids, attention = base["input_ids"], base["attention_mask"]
        if ids.shape[1] < 2:
            return None
        # The positions generate itself gives a left-padded row (padding at position 1).
        positions = (attention.long().cumsum(-1) - 1).masked_fill(attention == 0, 1)
        out = self.peft(input_ids=ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1],
                        use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(num_rollouts)
        return cache

    def option_logprobs(self, prompts: Sequence[EncodedPrompt], *, temperature: float = 1.0,
                        adapter: bool = True) -> list[list[float]]:
        """log pi(option) of every allowed answer of each constrained prompt, in ``answer_sequences`` order.

        The probability :meth:`generate` samples each whole answer with (the constrained
        next-token distributions, multiplied along the answer), so the values of one
        prompt sum to 1 in probability. Threshold-free: they show a model moving towards
        the right answer before its most likely answer changes. One forward per option.
        """
        owners, seqs = [], []
        for i, p in enumerate(prompts):
            if not p.answer_sequences:
                raise ValueError(f"prompt {p.record_id} is not constrained: it has no answer options to score")
            owners += [i] * len(p.answer_sequences)
            seqs += p.answer_sequences
        width = max(len(s) for s in seqs)
        responses = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width))
        for row, seq in enumerate(seqs):
            responses[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1.0
        rollouts = Rollouts(list(prompts), torch.tensor(owners), responses, mask, [""] * len(seqs))
        self.peft.eval()
        with torch.no_grad():
            totals = self.token_logprobs(rollouts, range(len(seqs)), temperature=temperature, adapter=adapter).sum(1)
        out: list[list[float]] = [[] for _ in prompts]
        for owner, value in zip(owners, totals.tolist(), strict=True):
            out[owner].append(float(value))
        return out

    def sampling_config(self, *, temperature: float, max_new_tokens: int) -> GenerationConfig:
        """The generation config of :meth:`generate`: plain sampling at ``temperature``.

        Top-p 1, top-k 0 and no repetition penalty are explicit; every field left None is
        filled by ``generate`` from the model's own generation config, which
        :meth:`generate` replaces by an empty one while it runs (library defaults only).
        """
        sampling = temperature > 0
        return GenerationConfig(
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=1.0 if sampling else None,
            top_k=0 if sampling else None,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.bundle.eos_token_ids,
            pad_token_id=self.pad_id,
            suppress_tokens=self.suppressed or None,
            use_cache=True,
        )

    def _response_mask(self, responses: torch.Tensor) -> torch.Tensor:
        is_end = torch.zeros_like(responses, dtype=torch.bool)
        for e in self.bundle.eos_token_ids:
            is_end |= responses == e
        # 1 up to and including the first end token; everything after is padding.
        after_end = (is_end.long().cumsum(1) - is_end.long()) > 0
        return (~after_end).float()

    # ------------------------------------------------------------------ log-probabilities

    def token_logprobs(
        self,
        rollouts: Rollouts,
        rows: Sequence[int],
        *,
        temperature: float,
        adapter: bool = True,
        module: Any | None = None,
        with_entropy: bool = False,
    ) -> Any:
        """Per-token log pi(response token) for ``rows``: [len(rows), T] (0 where masked).

        ``adapter=False`` gives the reference policy (:meth:`set_reference`). ``module`` is the
        callable to run (e.g. an Opacus GradSampleModule wrapping the PEFT model).
        ``with_entropy=True`` returns ``(logp, entropy)``, the entropy of the (constrained)
        next-token distribution at every response position.
        """
        rows = list(rows)
        prompts = [rollouts.prompts[int(rollouts.prompt_index[r])] for r in rows]
        inputs = self._inputs(prompts)
        resp = rollouts.responses[rows].to(self.bundle.device)
        rmask = rollouts.mask[rows].to(self.bundle.device)
        T = resp.shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], resp], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], rmask.long()], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(resp)], dim=1)
        if not self.bundle.multimodal:
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        call = module if module is not None else self.peft
        ctx = contextlib.nullcontext() if adapter else self.reference()
        with ctx, self.autocast():
            logits = call(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :-1, :]
        logits = logits.float() / temperature
        if rollouts.first_bias is not None:  # generate adds it before its temperature
            for i, r in enumerate(rows):
                for tok, b in (rollouts.first_bias[int(rollouts.prompt_index[r])] or {}).items():
                    logits[i, 0, tok] += b / temperature
        if self.suppressed:  # never sampled (see generate), so never scored either
            logits[..., self.suppressed] = float("-inf")
        if all(p.answer_sequences for p in prompts):
            mask = torch.stack(
                [
                    allowed_mask(OptionTrie(p.answer_sequences or []), r.tolist(), logits.shape[-1], pad_id=self.pad_id)
                    for p, r in zip(prompts, resp.cpu(), strict=True)
                ]
            ).to(logits.device)
            logits = logits.masked_fill(~mask, float("-inf"))
        log_probs = F.log_softmax(logits, dim=-1)
        logp = torch.gather(log_probs, 2, resp.unsqueeze(-1)).squeeze(-1)
        logp = torch.where(rmask > 0, logp, torch.zeros_like(logp))
        if not with_entropy:
            return logp
        finite = torch.isfinite(log_probs)  # masked (disallowed) tokens are -inf
        safe = torch.where(finite, log_probs, torch.zeros_like(log_probs))
        plogp = torch.where(finite, safe.exp(), torch.zeros_like(safe)) * safe
        entropy = torch.where(rmask > 0, -plogp.sum(-1), torch.zeros_like(logp))
        return logp, entropy
