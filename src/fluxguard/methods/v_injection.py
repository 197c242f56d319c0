"""FLUX V injection for Flux-Guard's "Structuring": store the attention values of the late single-stream blocks
during inversion, replay them during generation (``design/methods.md`` §2.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class ValueBank:
    """Stores (inversion) or replays (generation) attention values keyed by (step key, midpoint?, block)."""

    def __init__(self, storage: torch.device | str | None = None) -> None:
        self.storage = storage
        self.mode: str | None = None
        self.key: tuple[int, bool] | None = None
        self.bank: dict[tuple[int, bool, int], torch.Tensor] = {}
        self.replayed = 0

    def set(self, mode: str | None, key: tuple[int, bool] | None = None) -> None:
        self.mode, self.key = mode, key

    def __call__(self, block: int, value: torch.Tensor) -> torch.Tensor:
        if self.mode is None or self.key is None:
            return value
        k = (*self.key, block)
        if self.mode == "store":
            self.bank[k] = value.detach().to(self.storage or value.device)
            return value
        stored = self.bank[k].to(device=value.device, dtype=value.dtype)
        self.replayed += 1
        return stored.expand_as(value) if stored.shape[0] != value.shape[0] else stored

    def clear(self) -> None:
        self.bank.clear()
        self.replayed = 0
        self.set(None)


class VInjectionAttnProcessor:
    """FLUX single-stream attention that passes its ``value`` (text + image tokens) through a :class:`ValueBank`.

    Same computation as diffusers' ``FluxAttnProcessor`` for single-stream blocks (no separate text stream).
    """

    def __init__(self, bank: ValueBank, block: int) -> None:
        self.bank = bank
        self.block = block

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is not None:
            raise RuntimeError("VInjectionAttnProcessor is for FLUX single-stream blocks only")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = self.bank(self.block, value.unflatten(-1, (-1, attn.head_dim)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        return out.flatten(2, 3).to(query.dtype)


def v_injection_blocks(num_single: int, first: int = 20, reference: int = 38) -> list[int]:
    """Indices of the single-stream blocks whose V is stored/replaced (20..37 for FLUX.1-dev's 38)."""
    start = first if num_single == reference else (first * num_single) // reference
    return list(range(min(start, num_single), num_single))


class VInjection:
    """Context manager: V-injection processors on the chosen blocks, originals restored on exit."""

    def __init__(self, transformer: nn.Module, bank: ValueBank, blocks: Sequence[int]) -> None:
        self.blocks = [transformer.single_transformer_blocks[i] for i in blocks]
        self.idx = list(blocks)
        self.bank = bank
        self.saved: list[Any] = []

    def __enter__(self) -> VInjection:
        for i, blk in zip(self.idx, self.blocks, strict=True):
            self.saved.append(blk.attn.processor)
            blk.attn.set_processor(VInjectionAttnProcessor(self.bank, i))
        return self

    def __exit__(self, *exc: object) -> None:
        for blk, proc in zip(self.blocks, self.saved, strict=True):
            blk.attn.set_processor(proc)


__all__ = ["VInjection", "VInjectionAttnProcessor", "ValueBank", "v_injection_blocks"]
