"""Option-constrained decoding: the answer is sampled only among a record's options.

Each allowed continuation is a token sequence (option + suffix + end-of-turn). A trie over
them gives, after any prefix, the set of tokens that may come next. Generation masks all
other logits; training computes log-probabilities under the *same* mask, so the policy
being optimised is exactly the one that sampled (forced tokens have log-probability 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers.generation.logits_process import LogitsProcessor

__all__ = ["OptionTrie", "ConstrainedLogits", "allowed_mask"]


class OptionTrie:
    """Prefix tree over token sequences."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        if not sequences:
            raise ValueError("constrained decoding needs at least one allowed answer")
        self._root: dict[int, dict] = {}
        for seq in sequences:
            node = self._root
            for tok in seq:
                node = node.setdefault(int(tok), {})

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow ``prefix`` (empty once a sequence is complete)."""
        node = self._root
        for tok in prefix:
            nxt = node.get(int(tok))
            if nxt is None:
                return []
            node = nxt
        return sorted(node)


class ConstrainedLogits(LogitsProcessor):
    """Masks every token the row's trie does not allow (for ``model.generate``).

    ``first_bias`` (one ``{token: bias}`` or ``None`` per row) is added to the logits of the
    first response token: the logit adjustment of common/answer_prior.py. ``generate`` runs
    this processor before its temperature, so the sampled distribution is
    ``softmax((logits + bias) / temperature)``, what ``Policy.token_logprobs`` scores.
    """

    def __init__(self, tries: Sequence[OptionTrie], prompt_length: int, pad_id: int,
                 first_bias: Sequence[Mapping[int, float] | None] | None = None) -> None:
        self.tries = list(tries)
        self.prompt_length = prompt_length
        self.pad_id = pad_id
        if first_bias is not None and len(first_bias) != len(self.tries):
            raise ValueError(f"{len(first_bias)} first-token biases for {len(self.tries)} rows")
        self.first_bias = list(first_bias) if first_bias is not None else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        first = input_ids.shape[1] == self.prompt_length
        for row, trie in enumerate(self.tries):
            allowed = trie.allowed(input_ids[row, self.prompt_length :].tolist()) or [self.pad_id]
            mask[row, allowed] = 0.0
            bias = self.first_bias[row] if (first and self.first_bias is not None) else None
            for tok, b in (bias or {}).items():
                mask[row, tok] += b
        return scores + mask


def allowed_mask(trie: OptionTrie, response: Sequence[int], vocab_size: int, *, pad_id: int) -> torch.Tensor:
    """Boolean [len(response), vocab] mask of the tokens allowed at each response position."""
    mask = torch.zeros((len(response), vocab_size), dtype=torch.bool)
    for t in range(len(response)):
        allowed = trie.allowed(response[:t]) or [pad_id]
        mask[t, allowed] = True
    return mask
