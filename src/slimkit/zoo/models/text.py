"""Transformers written out layer by layer: a BERT-style encoder (post-LN) and a GPT-style decoder
(pre-LN, causal). Attention uses separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``
Linear layers, so that head pruning can shrink them and quantization sees each one; the number of
heads is read from ``q_proj``'s width at run time, so a model with pruned heads needs no other edit.
The LM head is not tied to the token embedding, so that each can be compressed on its own."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.zoo.models import MODELS, tokens


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``causal`` hides future positions with a boolean mask buffer of
    ``max_len`` x ``max_len`` (True = hidden)."""

    mask: torch.Tensor

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        causal: bool = False,
        max_len: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ConfigError(
                f"d_model={d_model} is not divisible by n_head={n_head}",
                fix="choose n_head that divides d_model",
            )
        self.head_dim = d_model // n_head
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.causal = causal
        if causal:
            mask = torch.ones(max_len, max_len, dtype=torch.bool).triu(1)
            self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, H*Dh) -> (B, T, H, Dh) -> (B, H, T, Dh)
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, T)
        if self.causal:
            t = x.size(1)  # narrow, not [:t, :t]: torch.fx cannot slice a buffer by a traced size
            att = att.masked_fill(self.mask.narrow(0, 0, t).narrow(1, 0, t), float("-inf"))
        att = self.attn_drop(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).flatten(2)  # (B, H, T, Dh) -> (B, T, H, Dh) -> (B, T, H*Dh)
        return self.out_proj(y)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear -> dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Transformer block on (B, T, d_model): pre-LN ``x + f(ln(x))`` (GPT) or post-LN
    ``ln(x + f(x))`` (BERT)."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_ff: int,
        *,
        pre_norm: bool,
        causal: bool = False,
        max_len: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_head, causal=causal, max_len=max_len, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln1(x)))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.drop(self.attn(x)))
        return self.ln2(x + self.mlp(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class GPT(nn.Module):
    """Decoder-only language model: token ids (B, T), T <= seq_len -> next-token logits
    (B, T, vocab_size)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        n_layer: int,
        d_model: int,
        n_head: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *(
                Block(
                    d_model,
                    n_head,
                    4 * d_model,
                    pre_norm=True,
                    causal=True,
                    max_len=seq_len,
                    dropout=dropout,
                )
                for _ in range(n_layer)
            )
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, d) + (T, d)
        return self.lm_head(self.ln_f(self.blocks(x)))  # (B, T, vocab_size)


class Encoder(nn.Module):
    """BERT-style encoder: token + learned position embeddings, LayerNorm, post-LN blocks. Returns
    the last hidden state (B, T, d_model), or with ``num_classes`` the logits of a linear ``head``
    on the mean over positions (B, num_classes)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        n_layer: int,
        d_model: int,
        n_head: int,
        d_ff: int,
        num_classes: int | None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.emb_ln = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *(Block(d_model, n_head, d_ff, pre_norm=False, dropout=dropout) for _ in range(n_layer))
        )
        self.head = None if num_classes is None else nn.Linear(d_model, num_classes)
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.drop(self.emb_ln(self.tok_emb(idx) + self.pos_emb(pos)))  # (B, T, d)
        x = self.blocks(x)
        if self.head is None:
            return x
        return self.head(x.mean(dim=1))  # (B, T, d) -> (B, d) -> (B, num_classes)


def lm_shape(batch: int, *, seq_len: int, vocab_size: int, **_: object) -> tuple[int, ...]:
    """``output_shape`` of a language model: (batch, seq_len, vocab_size)."""
    return (batch, seq_len, vocab_size)


def _encoder_shape(
    batch: int, *, seq_len: int, d_model: int, num_classes: int | None, **_: object
) -> tuple[int, ...]:
    return (batch, seq_len, d_model) if num_classes is None else (batch, num_classes)


@MODELS.register(
    "gpt",
    kind="task",
    inputs=tokens(256, 128),
    output_shape=lm_shape,
    summary="byte-level GPT: 4 layers, d 128, 4 heads, context 128 -> (B, T, 256) logits",
)
def gpt(
    *,
    vocab_size: int = 256,
    seq_len: int = 128,
    n_layer: int = 4,
    d_model: int = 128,
    n_head: int = 4,
    dropout: float = 0.0,
) -> GPT:
    return GPT(**locals())  # every option, by name


@MODELS.register(
    "bert_encoder",
    kind="reference",
    inputs=tokens(30522, 128),
    output_shape=_encoder_shape,
    summary="BERT-mini encoder: 4 post-LN layers, hidden 256, 4 heads, FFN 1024, seq 128",
)
def bert_encoder(
    *,
    vocab_size: int = 30522,
    seq_len: int = 128,
    n_layer: int = 4,
    d_model: int = 256,
    n_head: int = 4,
    d_ff: int = 1024,
    num_classes: int | None = None,
    dropout: float = 0.1,
) -> Encoder:
    return Encoder(**locals())  # every option, by name


@MODELS.register(
    "text_classifier",
    kind="task",
    inputs=tokens(256, 128),
    output_shape=_encoder_shape,
    summary="small byte-level BERT-style classifier: 2 layers, hidden 128, 8 classes",
)
def text_classifier(
    *,
    vocab_size: int = 256,
    seq_len: int = 128,
    n_layer: int = 2,
    d_model: int = 128,
    n_head: int = 4,
    d_ff: int = 256,
    num_classes: int | None = 8,
    dropout: float = 0.1,
) -> Encoder:
    return Encoder(**locals())  # every option, by name
