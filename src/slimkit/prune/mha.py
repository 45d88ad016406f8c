"""``nn.MultiheadAttention`` made prunable by heads.

``nn.MultiheadAttention`` packs q / k / v into one ``in_proj_weight`` and requires the inner width
to equal ``embed_dim``, so no head can be removed from it. ``split_attention`` replaces each one
(in place) by :class:`HeadAttention`, which computes the same with separate ``q_proj`` /
``k_proj`` / ``v_proj`` / ``out_proj`` Linear layers and a ``head_dim``, and takes its head count
from ``q_proj``'s width: the dependency graph then prunes it by whole heads, as it does the zoo's
attention. ``prune_channels`` does this on its copy and records the names, so ``load_pruned``
replays it. Modules with ``bias_k`` / ``add_zero_attn`` or different key / value widths stay as
they are (and stay refused).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class HeadAttention(nn.Module):
    """Multi-head attention with separate projections; call it as ``nn.MultiheadAttention``."""

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0,
                 bias: bool = True, batch_first: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, m: nn.MultiheadAttention) -> HeadAttention:
        """The same attention as ``m`` (its weights copied)."""
        new = cls(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                  batch_first=m.batch_first)  # fmt: skip
        e = m.embed_dim
        assert m.in_proj_weight is not None
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(m.in_proj_weight[i * e : (i + 1) * e])
                if m.in_proj_bias is not None:
                    proj.bias.copy_(m.in_proj_bias[i * e : (i + 1) * e])
            new.out_proj.weight.copy_(m.out_proj.weight)
            if m.out_proj.bias is not None:
                new.out_proj.bias.copy_(m.out_proj.bias)
        return new.train(m.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
        hd = self.head_dim

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, H * hd) -> (B, H, T, hd)
            return x.reshape(b, x.shape[1], -1, hd).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, H, Lq, Lk)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(b, -1, n_q, n_k)
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask, float("-inf"))
            else:
                scores = scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :]
            if pad.dtype == torch.bool:
                scores = scores.masked_fill(pad, float("-inf"))
            else:
                scores = scores + pad
        weights = scores.softmax(-1)
        out = F.dropout(weights, self.dropout, self.training) @ v  # (B, H, Lq, hd)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n_q, -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def splittable(m: nn.Module) -> bool:
    return (isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim
            and m.bias_k is None and not m.add_zero_attn)  # fmt: skip


def split_attention(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` that can be (in place) by the equal
    :class:`HeadAttention`; returns their names. Those inside a ``torch.nn`` layer (the
    ``nn.TransformerEncoderLayer`` fast path reads ``in_proj_weight``) are left alone."""
    done = []
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    for name, m in list(model.named_modules()):
        if splittable(m):
            assert isinstance(m, nn.MultiheadAttention)
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if type(parent).__module__.startswith("torch.") and not isinstance(parent, containers):
                continue
            setattr(parent, leaf, HeadAttention.from_mha(m))
            done.append(name)
    return done
