"""Tests of common.modeling.policy (with prompts and constrained decoding) on tiny models.

The reference for log-probabilities is the model's own ``generate`` output: the raw
per-step logits (``output_logits=True``) of the very sampling run, divided by the same
temperature and restricted to the tokens the options allow (computed here from the
answer token sequences, independently of the trie). Policy.token_logprobs recomputes the
same numbers by one teacher-forced forward pass, so the two only agree when padding,
positions (Qwen's 3-D RoPE included), masks and alignment are all right.

lora_B is random in every policy here: PEFT's zero B would make "adapter on" and
"adapter off" identical and hide adapter mix-ups.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.climb.inputs import RecordVisuals
from common.climb.records import Record, parse_record
from common.config import ModelConfig, load_config
from common.modeling.constrained import ConstrainedLogits, OptionTrie
from common.modeling.loader import load_base_model
from common.modeling.lora import adapter_shapes, init_adapter
from common.modeling.policy import Policy
from common.modeling.prompts import EncodedPrompt, collate_prompts, encode_prompt

PREFIX = "<think>\n</think>\n\\boxed{"
TEMPERATURE = 0.7
B_STD = 0.3
# Added to the <|im_end|> logit in free-form runs so that rows end at different steps.
END_BIAS = 4.0


def _record(prompt: str, answer: str, images: list[str], line: int) -> Record:
    obj = {
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
        "images": images,
    }
    return parse_record(obj, root="/data", file="chest/tiny/annotation_train.jsonl", line=line, split="train")


RECORDS = [
    # Options sharing their first tokens ("BIRAD 1/2/3") exercise the trie's branching.
    _record(
        "<image>\nAbove is a mammogram. What is the BIRAD classification? "
        "Answer with one phrase from the following:\nBIRAD 1\nBIRAD 2\nBIRAD 3\nNormal",
        "BIRAD 2",
        ["a.png"],
        1,
    ),
    # Two images and a shorter question: a prompt of a different length.
    _record(
        "<image>\n<image>\nAbove is a chest X-ray image of a patient. "
        "Answer with one phrase from the following:\nPneumonia\nEffusion",
        "Effusion",
        ["a.png", "b.png"],
        2,
    ),
    _record(
        "<image>\nWhat is it? Answer with one phrase from the following:\nNo Finding\nFracture\nLung Lesion",
        "Fracture",
        ["c.png"],
        3,
    ),
]
IMAGES_PER_RECORD = [1, 2, 1]


def _visuals(rng: np.random.Generator, n: int) -> RecordVisuals:
    images = [Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(n)]
    return RecordVisuals(images=images, per_placeholder=[1] * n, leading=0)


def _randomise_b(policy: Policy, seed: int) -> None:
    """A seeded adapter with a random B (PEFT's own A init draws from the global RNG)."""
    policy.set_adapter(init_adapter(adapter_shapes(policy.peft), seed=seed, b_std=B_STD))


def _encode_all(bundle, prompt_cfg, *, multimodal: bool) -> list[EncodedPrompt]:
    rng = np.random.default_rng(0)
    visuals = [_visuals(rng, n) if multimodal else RecordVisuals() for n in IMAGES_PER_RECORD]
    return [encode_prompt(bundle, r, v, prompt_cfg) for r, v in zip(RECORDS, visuals, strict=True)]


class Setup:
    def __init__(self, cfg, bundle, policy: Policy, multimodal: bool) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.policy = policy
        self.constrained = _encode_all(bundle, cfg.prompt, multimodal=multimodal)
        self.free = _encode_all(bundle, replace(cfg.prompt, constrained=False), multimodal=multimodal)

    def prompts(self, constrained: bool) -> list[EncodedPrompt]:
        return self.constrained if constrained else self.free


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    torch.set_num_threads(1)
    c = load_config()
    assert c.prompt.constrained and c.prompt.constrained_prefix == PREFIX and c.prompt.constrained_suffix == "}"
    c.model.cache_dir = os.environ.get("FEDCLIMB_CACHE") or str(tmp_path_factory.mktemp("models"))
    c.model.device = "cpu"
    return c


@pytest.fixture(scope="module")
def mm(cfg) -> Setup:
    """The tiny multimodal Qwen2.5-VL with a LoRA adapter whose B is random."""
    bundle = load_base_model(cfg.model)
    policy = Policy(bundle, cfg.lora)
    _randomise_b(policy, seed=1)
    return Setup(cfg, bundle, policy, multimodal=True)


@pytest.fixture(scope="module")
def text(cfg, mm, tmp_path_factory) -> Setup:
    """A tiny text-only Qwen2ForCausalLM with the same tokenizer, loaded as an HF folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = mm.bundle.tokenizer
    pad, eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=cfg.model.tiny.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    folder = tmp_path_factory.mktemp("tiny-text")
    model.save_pretrained(folder)
    # The same tokenizer files. (Loaded next to a qwen2 config.json, the Auto class reads them
    # as a Qwen2Tokenizer, which splits digits apart; the test does not depend on that.)
    tok.save_pretrained(folder)
    bundle = load_base_model(ModelConfig(source="hf", name_or_path=str(folder), device="cpu"))
    assert not bundle.multimodal and type(bundle.model).__name__ == "Qwen2ForCausalLM"
    policy = Policy(bundle, cfg.lora)
    _randomise_b(policy, seed=2)
    return Setup(cfg, bundle, policy, multimodal=False)


@contextlib.contextmanager
def end_bias(policy: Policy, bias: float) -> Iterator[None]:
    """Make <|im_end|> likelier in every forward pass (generation and scoring alike)."""
    end = policy.bundle.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def hook(module, args, output):
        output = output.clone()
        output[..., end] += bias
        return output

    handle = policy.peft.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _allowed_by_hand(sequences: list[list[int]], prefix: list[int]) -> set[int]:
    return {s[len(prefix)] for s in sequences if len(s) > len(prefix) and s[: len(prefix)] == prefix}


def _reference_from_generate(
    policy: Policy, rows: list[EncodedPrompt], *, seed: int, max_new_tokens: int, processors: list | None
):
    """Sample again with the model's own generate (same seed) and keep its raw logits."""
    batch = collate_prompts(rows, pad_id=policy.pad_id, image_token_id=policy.image_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = policy.peft.generate(
            **batch,
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            logits_processor=processors,
            eos_token_id=policy.bundle.eos_token_ids,
            pad_token_id=policy.pad_id,
            suppress_tokens=policy.suppressed or None,
            output_logits=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out, batch["input_ids"].shape[1]


# ---------------------------------------------------------------------------- constrained


def test_prompts_have_different_lengths(mm, text):
    for setup in (mm, text):
        for prompts in (setup.constrained, setup.free):
            lengths = [len(p.input_ids) for p in prompts]
            assert len(set(lengths)) == len(lengths), lengths
    # Left padding: the shorter prompts start with pad tokens and a zero mask.
    batch = collate_prompts(mm.constrained, pad_id=mm.policy.pad_id, image_token_id=mm.policy.image_token_id)
    short = min(range(len(RECORDS)), key=lambda i: len(mm.constrained[i].input_ids))
    gap = batch["input_ids"].shape[1] - len(mm.constrained[short].input_ids)
    assert gap > 0 and batch["attention_mask"][short, :gap].sum() == 0
    assert bool((batch["input_ids"][short, :gap] == mm.policy.pad_id).all())


def test_prompt_text_ends_with_the_constrained_prefix(mm):
    tok = mm.bundle.tokenizer
    for p in mm.constrained:
        assert tok.decode(p.input_ids).endswith("<|im_start|>assistant\n" + PREFIX)
        assert p.response_prefix == PREFIX
    two_images = tok.decode(mm.constrained[1].input_ids)
    # Two square images resized to min_pixels = max_pixels = side^2 pixels: (side / 14)^2
    # patches of 14 px, merged 2 x 2 -> (side / 28)^2 pad tokens each (112 px -> 16, 168 px -> 36).
    side = int(round(mm.cfg.model.max_pixels**0.5))
    per_image = (side // 28) ** 2
    assert two_images.count("<|image_pad|>") == 2 * per_image and two_images.count("<|vision_start|>") == 2


def test_constrained_generation_only_produces_the_options(mm):
    rollouts = mm.policy.generate(
        mm.constrained, num_rollouts=24, temperature=1.0, max_new_tokens=16, seed=0
    )
    assert rollouts.num_rows == 24 * len(RECORDS)
    seen: list[set[str]] = [set() for _ in RECORDS]
    for row, text in enumerate(rollouts.texts):
        p = int(rollouts.prompt_index[row])
        allowed = {f"{PREFIX}{opt}}}" for opt in RECORDS[p].options}
        assert text in allowed, (row, text)
        seen[p].add(text)
    # Sampling at temperature 1 really explores (the random adapter makes some records peaked).
    assert sum(len(s) for s in seen) >= len(RECORDS) + 2, seen
    assert rollouts.texts[0] in {
        "<think>\n</think>\n\\boxed{BIRAD 1}",
        "<think>\n</think>\n\\boxed{BIRAD 2}",
        "<think>\n</think>\n\\boxed{BIRAD 3}",
        "<think>\n</think>\n\\boxed{Normal}",
    }
    # Each row's tokens are exactly one answer sequence, mask 1 on it and 0 after.
    for row in range(rollouts.num_rows):
        seqs = mm.constrained[int(rollouts.prompt_index[row])].answer_sequences
        n = int(rollouts.mask[row].sum())
        assert rollouts.responses[row, :n].tolist() in seqs
        assert bool((rollouts.mask[row, :n] == 1).all()) and bool((rollouts.mask[row, n:] == 0).all())
        assert bool((rollouts.responses[row, n:] == mm.policy.pad_id).all())


# ---------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("which", ["mm", "text"])
@pytest.mark.parametrize("constrained", [True, False], ids=["constrained", "free"])
def test_token_logprobs_equal_the_generation_scores(request, which, constrained):
    setup: Setup = request.getfixturevalue(which)
    policy = setup.policy
    prompts = setup.prompts(constrained)
    k, seed, max_new = 3, 11, 8
    bias = contextlib.nullcontext() if constrained else end_bias(policy, END_BIAS)
    with bias:
        rollouts = policy.generate(
            prompts, num_rollouts=k, temperature=TEMPERATURE, max_new_tokens=max_new, seed=seed
        )
        rows = list(range(rollouts.num_rows))
        row_prompts = [prompts[int(i)] for i in rollouts.prompt_index]
        processors = None
        if constrained:
            # The reference run must sample the same tokens, so it decodes under the option
            # constraint too; its raw logits are still unmasked and the mask is applied below.
            batch = collate_prompts(row_prompts, pad_id=policy.pad_id, image_token_id=policy.image_token_id)
            tries = [OptionTrie(p.answer_sequences or []) for p in row_prompts]
            processors = [ConstrainedLogits(tries, batch["input_ids"].shape[1], policy.pad_id)]
            max_new = max(len(s) for p in prompts for s in p.answer_sequences or [])
        out, length = _reference_from_generate(
            policy, row_prompts, seed=seed, max_new_tokens=max_new, processors=processors
        )
        logp = policy.token_logprobs(rollouts, rows, temperature=TEMPERATURE).detach()

    generated = out.sequences[:, length:]
    steps = generated.shape[1]
    assert rollouts.responses.shape == (len(rows), steps)
    mask = rollouts.mask
    # The same seed and inputs sample the same tokens.
    assert torch.equal(generated * mask.long(), rollouts.responses * mask.long())

    expected = torch.zeros_like(logp)
    informative = 0
    for i, p in enumerate(row_prompts):
        tokens = rollouts.responses[i].tolist()
        for t in range(steps):
            if mask[i, t] == 0:
                continue
            scores = out.logits[t][i].float() / TEMPERATURE
            # vision placeholders are never sampled nor scored (Policy.suppressed)
            scores[policy.suppressed] = float("-inf")
            if constrained:
                allowed = _allowed_by_hand(p.answer_sequences or [], tokens[:t])
                keep = torch.full_like(scores, float("-inf"))
                keep[sorted(allowed)] = 0.0
                scores = scores + keep
                informative += len(allowed) > 1
            expected[i, t] = F.log_softmax(scores, dim=-1)[tokens[t]]
    torch.testing.assert_close(logp, expected, atol=1e-4, rtol=0)
    assert bool((logp[mask == 0] == 0).all())
    if constrained:
        # Forced tokens have log-probability 0; branching ones carry the comparison.
        assert informative >= len(rows) and float(logp.sum()) < 0
    else:
        lengths = mask.sum(1)
        # The comparison covers rows of different lengths, some ended early by <|im_end|>.
        assert int(lengths.min()) < steps and len(set(lengths.tolist())) >= 2
        assert bool((logp[mask == 1] < 0).all())


def test_first_token_bias_is_the_distribution_sampled_and_scored(mm):
    """Logit adjustment (train.logit_adjustment): generate samples softmax((z + b) / T) at the
    first answer token, and token_logprobs scores exactly that distribution."""
    policy, prompts = mm.policy, mm.constrained
    bias = [{p.answer_sequences[0][0]: 1.5, p.answer_sequences[1][0]: -1.0} for p in prompts]
    rollouts = policy.generate(prompts, num_rollouts=4, temperature=TEMPERATURE, max_new_tokens=16, seed=5,
                               first_bias=bias)
    assert rollouts.first_bias == bias
    row_prompts = [prompts[int(i)] for i in rollouts.prompt_index]
    batch = collate_prompts(row_prompts, pad_id=policy.pad_id, image_token_id=policy.image_token_id)
    tries = [OptionTrie(p.answer_sequences or []) for p in row_prompts]
    row_bias = [bias[int(i)] for i in rollouts.prompt_index]
    processors = [ConstrainedLogits(tries, batch["input_ids"].shape[1], policy.pad_id, row_bias)]
    max_new = max(len(s) for p in prompts for s in p.answer_sequences or [])
    out, length = _reference_from_generate(policy, row_prompts, seed=5, max_new_tokens=max_new, processors=processors)
    mask = rollouts.mask
    assert torch.equal(out.sequences[:, length:] * mask.long(), rollouts.responses * mask.long())
    rows = list(range(rollouts.num_rows))
    logp = policy.token_logprobs(rollouts, rows, temperature=TEMPERATURE).detach()
    # out.scores are what generate sampled from, after every processor and the temperature.
    first = rollouts.responses[:, 0]
    sampled = torch.stack([F.log_softmax(out.scores[0][i].float(), -1)[first[i]] for i in rows])
    torch.testing.assert_close(logp[:, 0], sampled, atol=1e-4, rtol=0)
    # By hand: the raw logits plus the bias, over the allowed first tokens, at temperature T.
    for i, p in enumerate(row_prompts):
        raw = out.logits[0][i].float()
        allowed = sorted(_allowed_by_hand(p.answer_sequences or [], []))
        z = torch.stack([raw[t] + row_bias[i].get(t, 0.0) for t in allowed]) / TEMPERATURE
        expected = F.log_softmax(z, -1)[allowed.index(int(first[i]))]
        assert abs(float(logp[i, 0]) - float(expected)) < 1e-4
    # Without the bias only the first position changes.
    rollouts.first_bias = None
    plain = policy.token_logprobs(rollouts, rows, temperature=TEMPERATURE).detach()
    assert float((plain[:, 0] - logp[:, 0]).abs().max()) > 0.1
    torch.testing.assert_close(plain[:, 1:], logp[:, 1:])
    # A large bias decides the answer.
    forced = policy.generate(prompts, num_rollouts=8, temperature=1.0, max_new_tokens=16, seed=6,
                             first_bias=[{p.answer_sequences[-1][0]: 40.0} for p in prompts])
    for row in range(forced.num_rows):
        p = prompts[int(forced.prompt_index[row])]
        assert int(forced.responses[row, 0]) == p.answer_sequences[-1][0]
    with pytest.raises(ValueError, match="constrained"):
        policy.generate(mm.free, num_rollouts=1, temperature=1.0, max_new_tokens=4, seed=0,
                        first_bias=[{1: 1.0} for _ in mm.free])


# ---------------------------------------------------------------------------- reference


def _base_logprobs_by_hand(base, policy: Policy, rollouts, rows: list[int], prompts: list[EncodedPrompt]):
    """Teacher-forced log-probs from a separately loaded base model (no LoRA at all)."""
    row_prompts = [prompts[int(rollouts.prompt_index[r])] for r in rows]
    length = max(len(p.input_ids) for p in row_prompts)
    resp, rmask = rollouts.responses[rows], rollouts.mask[rows]
    steps = resp.shape[1]
    ids = torch.full((len(rows), length + steps), policy.pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(row_prompts):
        n = len(p.input_ids)
        ids[i, length - n : length] = p.input_ids
        attn[i, length - n : length] = 1
    ids[:, length:] = resp
    attn[:, length:] = rmask.long()
    image = policy.bundle.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        logits = base(
            input_ids=ids,
            attention_mask=attn,
            pixel_values=torch.cat([p.pixel_values for p in row_prompts]),
            image_grid_thw=torch.cat([p.image_grid_thw for p in row_prompts]),
            mm_token_type_ids=(ids == image).long(),
        ).logits
    scores = logits[:, length - 1 : length + steps - 1].float() / TEMPERATURE
    scores[..., policy.suppressed] = float("-inf")  # never sampled nor scored (Policy.suppressed)
    logp = F.log_softmax(scores, dim=-1).gather(2, resp.unsqueeze(-1)).squeeze(-1)
    return torch.where(rmask > 0, logp, torch.zeros_like(logp))


def test_adapter_off_is_the_base_model(mm, cfg):
    policy = mm.policy
    with end_bias(policy, END_BIAS):
        rollouts = policy.generate(
            mm.free, num_rollouts=2, temperature=TEMPERATURE, max_new_tokens=6, seed=3
        )
    rows = list(range(rollouts.num_rows))
    with torch.no_grad():
        on = policy.token_logprobs(rollouts, rows, temperature=TEMPERATURE)
        off = policy.token_logprobs(rollouts, rows, temperature=TEMPERATURE, adapter=False)
        on_again = policy.token_logprobs(rollouts, rows, temperature=TEMPERATURE)
    base = load_base_model(cfg.model).model  # a second, untouched copy of the base weights
    assert not any("lora_" in n for n, _ in base.named_parameters())
    expected = _base_logprobs_by_hand(base, policy, rollouts, rows, mm.free)
    mask = rollouts.mask > 0
    torch.testing.assert_close(off, expected, atol=1e-5, rtol=0)
    # The random adapter matters, and disabling it was temporary.
    assert float((on - off)[mask].abs().max()) > 1e-2
    torch.testing.assert_close(on_again, on, atol=0, rtol=0)


def test_logprobs_backpropagate_to_lora_only(mm):
    policy = mm.policy
    rollouts = policy.generate(mm.free, num_rollouts=1, temperature=1.0, max_new_tokens=4, seed=5)
    policy.peft.zero_grad(set_to_none=True)
    logp = policy.token_logprobs(rollouts, [0, 1, 2], temperature=1.0)
    logp.sum().backward()
    grads = {n: p.grad for n, p in policy.peft.named_parameters() if p.requires_grad}
    assert len(grads) == 28
    # With B random, A's gradients are non-zero too (a zero B would make them exactly 0).
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    assert all(p.grad is None for p in policy.peft.parameters() if not p.requires_grad)
    policy.peft.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- free-form


def test_free_form_masks_stop_after_the_first_end_of_turn(mm):
    policy = mm.policy
    tok = mm.bundle.tokenizer
    ends = set(mm.bundle.eos_token_ids)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ends
    max_new = 10
    with end_bias(policy, END_BIAS):
        rollouts = policy.generate(
            mm.free, num_rollouts=8, temperature=1.0, max_new_tokens=max_new, seed=7
        )
    assert rollouts.responses.shape[1] <= max_new
    ended_early = 0
    for row in range(rollouts.num_rows):
        tokens = rollouts.responses[row].tolist()
        first_end = next((t for t, x in enumerate(tokens) if x in ends), None)
        n = len(tokens) if first_end is None else first_end + 1
        assert rollouts.mask[row].tolist() == [1.0] * n + [0.0] * (len(tokens) - n), row
        assert tokens[n:] == [policy.pad_id] * (len(tokens) - n)
        assert rollouts.texts[row] == tok.decode(tokens[:n], skip_special_tokens=True)
        ended_early += first_end is not None and first_end < len(tokens) - 1
    assert ended_early >= 3  # several rows end before the longest one does


def test_response_mask_by_hand(mm):
    """Tokens after the first end token (even a second one) are masked out."""
    end, pad = 2, 0
    assert set(mm.bundle.eos_token_ids) == {end, pad}
    responses = torch.tensor(
        [
            [7, end, 9, end, 5],
            [7, 8, 9, 10, 11],
            [end, 9, 9, 9, 9],
            [7, 8, pad, 9, 9],  # <|endoftext|> ends a response too
        ]
    )
    expected = torch.tensor(
        [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32
    )
    assert torch.equal(mm.policy._response_mask(responses), expected)  # noqa: SLF001


# ---------------------------------------------------------------------------- sampler = scorer


@pytest.mark.parametrize("which", ["mm", "text"])
def test_sampling_distribution_is_the_scored_one_whatever_the_checkpoint_config(request, which, monkeypatch):
    """A checkpoint's generation config (repetition penalty 2, top-p 0.5, top-k 3, n-gram
    blocking, a minimum length) must not reach the sampler: the processors ``generate``
    builds are only the temperature and masks that token_logprobs applies as well, and
    the processed per-step scores give the sampled tokens exactly the scored log-probs."""
    setup: Setup = request.getfixturevalue(which)
    policy = setup.policy
    base = policy.peft.get_base_model()
    checkpoint = base.generation_config
    for name, value in dict(repetition_penalty=2.0, top_p=0.5, top_k=3, no_repeat_ngram_size=1,
                            min_new_tokens=4, do_sample=False).items():
        monkeypatch.setattr(checkpoint, name, value)
    built: list = []
    scores: list = []
    original_processors = base._get_logits_processor  # noqa: SLF001
    original_generate = policy.peft.generate

    def capture_processors(*args, **kwargs):
        built.append(original_processors(*args, **kwargs))
        return built[-1]

    def generate_with_scores(**kwargs):
        out = original_generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(out.scores)  # per step: the logits after every processor, (R, V)
        return out.sequences

    monkeypatch.setattr(base, "_get_logits_processor", capture_processors)
    monkeypatch.setattr(policy.peft, "generate", generate_with_scores)
    with end_bias(policy, END_BIAS):
        rollouts = policy.generate(setup.free, num_rollouts=3, temperature=TEMPERATURE, max_new_tokens=6, seed=4)
        logp = policy.token_logprobs(rollouts, list(range(rollouts.num_rows)), temperature=TEMPERATURE).detach()

    # Prepare: what the sampler applied
    from transformers.generation.logits_process import SuppressTokensLogitsProcessor, TemperatureLogitsWarper

    kinds = {type(p) for p in built[0]}
    expected = {TemperatureLogitsWarper} | ({SuppressTokensLogitsProcessor} if policy.suppressed else set())
    assert kinds == expected, kinds
    assert checkpoint.repetition_penalty == 2.0  # restored after generate
    # Assert: the sampled tokens' log-probs under the processed scores are the scored ones
    sampled = torch.stack([F.log_softmax(s.float(), dim=-1) for s in scores[0]], dim=1)  # (R, T, V)
    sampled = sampled.gather(2, rollouts.responses.unsqueeze(-1)).squeeze(-1)
    mask = rollouts.mask > 0
    torch.testing.assert_close(logp[mask], sampled[mask], atol=1e-4, rtol=0)


def test_text_rollouts_run_each_prompt_once(text):
    """A text model's K rollouts of a prompt share one prefill: no forward pass over the whole
    prompt has more rows than there are prompts (the vision model's positions depend on its
    images, so it keeps generate's own prefill)."""
    policy = text.policy
    prompts = text.prompts(True)
    shapes: list[tuple[int, int]] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None:
            shapes.append(tuple(ids.shape))

    handle = policy.peft.get_base_model().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        rollouts = policy.generate(prompts, num_rollouts=4, temperature=1.0, max_new_tokens=6, seed=2)
    finally:
        handle.remove()
    assert rollouts.num_rows == 4 * len(prompts)
    longest = max(s[1] for s in shapes)
    assert longest >= 8 and all(rows == len(prompts) for rows, length in shapes if length == longest)
    assert all(length <= 2 for rows, length in shapes if rows == 4 * len(prompts))


@pytest.mark.parametrize("which", ["mm", "text"])
def test_option_logprobs_are_the_sampled_answer_probabilities(request, which):
    """Each constrained prompt's option probabilities sum to 1, and a sampled answer's summed
    token log-probs equal its option's value."""
    setup: Setup = request.getfixturevalue(which)
    policy = setup.policy
    prompts = setup.prompts(True)
    values = policy.option_logprobs(prompts)
    assert [len(v) for v in values] == [len(p.answer_sequences or []) for p in prompts]
    for v in values:
        assert sum(np.exp(v)) == pytest.approx(1.0, abs=1e-4)
        assert max(v) < 0.0  # no option is certain for a random model

    rollouts = policy.generate(prompts, num_rollouts=3, temperature=1.0, max_new_tokens=8, seed=5)
    logp = policy.token_logprobs(rollouts, list(range(rollouts.num_rows)), temperature=1.0).detach()
    for row in range(rollouts.num_rows):
        owner = int(rollouts.prompt_index[row])
        tokens = rollouts.responses[row][rollouts.mask[row] > 0].tolist()
        option = (prompts[owner].answer_sequences or []).index(tokens)
        assert float(logp[row].sum()) == pytest.approx(values[owner][option], abs=1e-4)

    with pytest.raises(ValueError, match="not constrained"):
        policy.option_logprobs(setup.prompts(False))
