"""Tests of the offline tiny tokenizer and the cached tiny Qwen2.5-VL build.

The tiny model is built in a fresh temporary cache here (not the shared test cache), so
the first load really builds it and the second load really reuses it.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from common.config import ModelConfig
from common.modeling import loader
from common.modeling import tokenizer as tokenizer_module
from common.modeling.loader import load_base_model
from common.modeling.tokenizer import SPECIAL_TOKENS, train_tiny_tokenizer

VOCAB = 1024


@pytest.fixture(scope="module")
def two_tokenizers():
    torch.set_num_threads(1)
    return train_tiny_tokenizer(VOCAB), train_tiny_tokenizer(VOCAB)


def test_training_is_deterministic(two_tokenizers):
    a, b = two_tokenizers
    # The fixed corpus runs out of merges before VOCAB: fewer ids, but always the same.
    assert 256 + len(SPECIAL_TOKENS) < len(a.get_vocab()) <= VOCAB
    assert a.get_vocab() == b.get_vocab()
    # The merges too, not only the vocabulary: the whole serialised tokenizer is equal.
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


@pytest.mark.parametrize(
    "text",
    [
        "Above is a chest X-ray image of a patient.",
        "<think>\n</think>\n\\boxed{Atrial fibrillation}",
        "Unseen wörds, ünïcode ✓ and   spaces\tand tabs 3.14159",
        "",
    ],
)
def test_round_trip(two_tokenizers, text):
    tok, _ = two_tokenizers
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(two_tokenizers):
    tok, _ = two_tokenizers
    for i, special in enumerate(SPECIAL_TOKENS):
        # Special tokens come first in the vocabulary, in the listed order.
        assert tok(special, add_special_tokens=False).input_ids == [i]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"


def test_frequent_corpus_words_are_merged(two_tokenizers):
    """BPE actually learnt merges: corpus words take far fewer tokens than bytes."""
    tok, _ = two_tokenizers
    for word in (" Triglycerides", " Pneumonia", "Normal"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tok("Cardiomegaly", add_special_tokens=False).input_ids) < len("Cardiomegaly") // 2


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args!r}")


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


def test_tiny_model_builds_offline_and_is_cached(fresh_cache, offline, monkeypatch):
    torch.set_num_threads(1)
    cfg = ModelConfig(cache_dir=str(fresh_cache), device="cpu")
    assert list(fresh_cache.iterdir()) == []
    first = load_base_model(cfg)
    folders = [p for p in fresh_cache.iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("tiny-")
    folder = folders[0]
    assert (folder / "done").is_file() and (folder / "config.json").is_file()
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    # The second load must not build anything: training the tokenizer now fails the test.
    def no_training(*args, **kwargs):
        raise AssertionError("the tiny model was rebuilt instead of read from the cache")

    monkeypatch.setattr(tokenizer_module, "train_tiny_tokenizer", no_training)
    second = load_base_model(cfg)
    assert loader._tiny_folder(cfg) == folder  # noqa: SLF001
    assert [p for p in fresh_cache.iterdir() if p.is_dir()] == [folder]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp

    a, b = first.model.state_dict(), second.model.state_dict()
    assert set(a) == set(b) and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert type(first.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert first.multimodal and first.image_processor is not None
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    assert not any(p.requires_grad for p in first.model.parameters())
    # the model's vocabulary is exactly the tokenizer's (the BPE may stop below the requested size)
    assert first.model.config.text_config.vocab_size == len(first.tokenizer) <= cfg.tiny.vocab_size


def test_a_different_tiny_size_or_seed_gets_its_own_folder(fresh_cache):
    a = ModelConfig(cache_dir=str(fresh_cache))
    other_seed = ModelConfig(cache_dir=str(fresh_cache))
    other_seed.tiny.init_seed = 1
    other_size = ModelConfig(cache_dir=str(fresh_cache))
    other_size.tiny.num_hidden_layers = 1
    folders = [loader._tiny_folder(c) for c in (a, other_seed, other_size)]  # noqa: SLF001
    assert len(set(folders)) == 3
    assert all((f / "done").is_file() for f in folders)


def test_chat_template_renders_an_image_part(fresh_cache):
    """The reloaded tokenizer (from the cache folder) keeps the chat template."""
    bundle_tok = load_base_model(ModelConfig(cache_dir=str(fresh_cache), device="cpu")).tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    ]
    text = bundle_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = bundle_tok.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDCLIMB_CACHE", str(tmp_path / "env"))
    assert loader.cache_root(ModelConfig()) == tmp_path / "env"
    assert loader.cache_root(ModelConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("FEDCLIMB_CACHE")
    assert loader.cache_root(ModelConfig()) == Path.home() / ".cache" / "fedclimb"
