"""SDPA over a padding-free batch one example at a time, instead of through a batch-wide mask.

transformers' own `sdpa` keeps the examples of a flattened row apart with a tokens x tokens mask:
for a batch of 16 examples it computes attention between every pair of the row's tokens and masks
most of it away, and with a mask SDPA cannot use its causal kernel. Measured on CPU
(benchmarks/padding_free.py, docs/performance.md), that left padding-free training 1.14x faster
than padded training on the tiny model, where computing attention per example gives 1.85x. This
attention function runs transformers' SDPA on each example's span (trl's collator gives the spans
as `cu_seq_lens_q`), causal, with the model's sliding window where it has one: the work of the
examples' own attention and nothing else. A batch with a padding mask, or any other call, gets
transformers' SDPA unchanged.

Training and held-out loss switch a model from `sdpa` to it for the trainer's lifetime
(`per_example_sdpa`), so generation (exact match, chat) never sees it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "flowertune_per_example_sdpa"


def _spans(query: torch.Tensor, key: torch.Tensor, cu_seq_lens: torch.Tensor | None,
           position_ids: torch.Tensor | None) -> list[int] | None:
    """Return where the examples of an unmasked batch start and end, or None under a KV cache."""
    length = query.shape[2]
    if length != key.shape[2]:
        return None  # a KV cache in front of the queries (generation)
    if cu_seq_lens is not None:
        return cu_seq_lens.tolist()
    restarts = [] if position_ids is None else (position_ids[:, 1:] == 0).any(dim=0).nonzero().flatten().tolist()
    if restarts and query.shape[0] != 1:
        raise ValueError("per-example attention takes flattened examples in one row, as trl's collator makes them")
    return [0, *[start + 1 for start in restarts], length]


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Return the (1, 1, length, length) causal mask that also hides keys `window` or more tokens back."""
    query, key = torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None, :]
    return ((key <= query) & (query - key < window))[None, None]


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Return SDPA's output (batch, tokens, heads, head dim) computed per example of a flattened row."""
    spans = None if attention_mask is not None else _spans(query, key, cu_seq_lens_q, kwargs.get("position_ids"))
    if spans is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lengths = [end - start for start, end in zip(spans[:-1], spans[1:])]
    outputs = []
    # split, not slicing: the backward of a slice adds into a zero tensor of the whole row, once per example.
    for length, q, k, v in zip(lengths, *(x.split(lengths, dim=2) for x in (query, key, value))):
        # No mask: transformers' SDPA then runs causal (its fast kernel); a sliding window needs one.
        mask = _window_mask(length, sliding_window, query.device) if sliding_window and length > sliding_window else None
        output, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1), None


def _mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Return SDPA's mask where there is padding; none otherwise (`attention` builds causality itself)."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


@contextmanager
def per_example_sdpa(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, compute `model`'s attention per example if it uses `sdpa`; else change nothing."""
    if model.config._attn_implementation != "sdpa":
        yield
        return
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _mask)
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
