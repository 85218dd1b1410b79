"""The small GPT that hosts MoE layers.

A decoder-only transformer (GPT-2 shape): token embedding, ``n_layers`` pre-norm blocks
``x + attn(LN(x))``, ``x + ffn(LN(x))``, a final LayerNorm and an output projection tied to the
token embedding. Attention is causal ``F.scaled_dot_product_attention``; positions are rotary
(RoPE, applied to queries and keys, GPT-NeoX half-split layout) or a learned table. The FFN of every
``moe_every``-th block is a :class:`locmoe.MoELayer` fed the input token ids (the ``hash`` router
needs them) and, when given, the node each token lives on (the locality loss and ``remote_share``);
the others are dense MLPs with the same activation and inner size as one expert.

``GPT.forward(ids)`` returns ``(logits, aux_loss)``: the router losses summed over the MoE layers
(zero for a dense model), to be added to the language-model loss; ``GPT.loss(ids, targets)``
returns ``(mean cross-entropy, aux_loss)`` without materialising all logits. ``routing_metrics()`` returns
each MoE layer's ``last_metrics`` (design §5) keyed by ``layer{index}``.

Initialisation (ours, GPT-2's): weights ~ N(0, init_std), output projections of each residual
branch (attention out, MLP out, expert ``w_out``) scaled by ``1/sqrt(2·n_layers)``, LayerNorm
identity. Routers keep their own initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from locmoe.config import ModelConfig
from locmoe.layer import MoELayer, read_metrics

LOSS_CHUNK_TOKENS = 512  # rows of the output projection per softmax chunk in GPT.loss (speed only)


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles ``θ_{t,j} = t · base^(−2j/head_dim)``: ``cos, sin`` each ``(seq_len, head_dim/2)``."""
    inverse_frequency = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inverse_frequency)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head: ``x (..., hd)`` with tables broadcastable to ``(..., hd/2)``."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.rotary = config.positions == "rotary"
        if self.rotary:
            cos, sin = rotary_tables(config.seq_len, self.head_dim, config.rope_base)
            # Derived from the config, so not saved in checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).unbind(dim=2)  # (B, T, H, hd)
        if self.rotary:
            # Rotated in the (B, T, H, hd) layout, where q and k are dense rows: much faster on CPU.
            cos, sin = self.rope_cos[:length, None, :], self.rope_sin[:length, None, :]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))


class DenseMLP(nn.Module):
    """``(…, d) -> (…, d)``: ``fc_out(GeLU(fc_in x))`` or SwiGLU ``fc_out(SiLU(fc_gate x) ⊙ fc_in x)``."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.fc_in = nn.Linear(d_model, d_ff, bias=False)
        self.fc_gate = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None
        self.fc_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is None:
            return self.fc_out(F.gelu(self.fc_in(x)))
        return self.fc_out(F.silu(self.fc_gate(x)) * self.fc_in(x))


class Block(nn.Module):
    """Pre-norm transformer block; its FFN is a ``MoELayer`` or a ``DenseMLP``."""

    def __init__(self, config: ModelConfig, use_moe: bool) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_ffn = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.ffn: MoELayer | DenseMLP
        if use_moe:
            self.ffn = MoELayer(
                config.d_model,
                config.d_ff,
                config.num_experts,
                router=config.router,
                top_k=config.top_k,
                activation=config.activation,
                dispatch=config.dispatch,
                routing_scope=config.routing_scope,
                experts_backend=config.experts_backend,
                ch_interval=config.ch_interval,
                **config.router_keywords(),
            )
        else:
            self.ffn = DenseMLP(config.d_model, config.d_ff, config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, token_ids: torch.Tensor, token_nodes: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm_attn(x)))
        normed = self.norm_ffn(x)
        if isinstance(self.ffn, MoELayer):
            ffn_out = self.ffn(normed, token_ids=token_ids, token_nodes=token_nodes)
        else:
            ffn_out = self.ffn(normed)
        return x + self.dropout(ffn_out)


class GPT(nn.Module):
    """GPT-style decoder: ``ids (B, T) -> (logits (B, T, V), aux_loss ())``."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid; allowed: a positive integer")
        self.config = config
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, config.d_model)
        self.position_embedding = (
            nn.Embedding(config.seq_len, config.d_model) if config.positions == "learned" else None
        )
        self.dropout = nn.Dropout(config.dropout)
        moe_indices = set(config.moe_layer_indices)
        self.blocks = nn.ModuleList(Block(config, i in moe_indices) for i in range(config.n_layers))
        self.norm_out = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.token_embedding.weight, std=std)
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            ffn = block.ffn
            if isinstance(ffn, MoELayer):
                nn.init.normal_(ffn.experts.w_in, std=std)
                if ffn.experts.w_gate is not None:
                    nn.init.normal_(ffn.experts.w_gate, std=std)
                nn.init.normal_(ffn.experts.w_out, std=residual_std)
            else:
                nn.init.normal_(ffn.fc_in.weight, std=std)
                if ffn.fc_gate is not None:
                    nn.init.normal_(ffn.fc_gate.weight, std=std)
                nn.init.normal_(ffn.fc_out.weight, std=residual_std)

    @property
    def moe_layers(self) -> dict[str, MoELayer]:
        """``layer{i}`` -> the ``MoELayer`` of block ``i`` (0-based)."""
        return {f"layer{i}": block.ffn for i, block in enumerate(self.blocks) if isinstance(block.ffn, MoELayer)}

    def features(self, ids: torch.Tensor, token_nodes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk: ``ids (B, T)`` -> final-normed hidden states ``(B, T, d)`` and the summed aux loss.
        ``token_nodes (B, T)``: the node each token lives on, for the MoE layers (``None`` = their default)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (batch, time), got {tuple(ids.shape)}")
        length = ids.shape[1]
        if length > self.config.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len={self.config.seq_len}")
        x = self.token_embedding(ids)
        if self.position_embedding is not None:
            x = x + self.position_embedding.weight[:length]
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, ids, token_nodes)
        aux_loss = sum((layer.aux_loss for layer in self.moe_layers.values()), x.new_zeros(()))
        return self.norm_out(x), aux_loss

    def forward(self, ids: torch.Tensor, token_nodes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids (B, T)`` -> ``logits (B, T, V)`` and the router losses summed over MoE layers ``()``."""
        hidden, aux_loss = self.features(ids, token_nodes)
        return self.lm_head(hidden), aux_loss

    def loss(
        self, ids: torch.Tensor, targets: torch.Tensor, token_nodes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy (nats) of ``targets (B, T)`` and the summed aux loss
        (``token_nodes`` as in :meth:`features`).

        Same value as ``cross_entropy(forward(ids)[0], targets)``, but the output projection and
        softmax run over ``LOSS_CHUNK_TOKENS`` rows at a time, so the full ``(B·T, V)`` logits (and
        their gradient) never exist at once: less memory traffic and a smaller peak memory.
        """
        hidden, aux_loss = self.features(ids, token_nodes)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = targets.reshape(-1)
        total = hidden.new_zeros(())
        for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
            logits = self.lm_head(hidden[start : start + LOSS_CHUNK_TOKENS])
            # float() is free in float32 and keeps the softmax in float32 under bf16 autocast.
            chunk_targets = targets[start : start + LOSS_CHUNK_TOKENS]
            total = total + F.cross_entropy(logits.float(), chunk_targets, reduction="sum")
        return total / targets.numel(), aux_loss

    def routing_metrics(self) -> dict[str, dict]:
        """Each MoE layer's ``last_metrics`` (plain floats/lists) from the last forward, read with one
        device synchronisation for all layers."""
        return read_metrics(self.moe_layers)

    def parameter_counts(self) -> dict[str, int]:
        """``total`` parameters (tied weights once) and ``active`` per token: each MoE layer counts
        ``top_k`` experts' weights instead of all ``n`` (k = 1 for every router except ``topk``).
        A layer whose experts are sharded over ranks counts all ``n`` experts, not only its own."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        for layer in self.moe_layers.values():
            held = layer.experts.num_experts  # n, or this rank's n / P
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // held
            top_k = int(getattr(layer.router, "top_k", 1) or 1)
            total += per_expert * (layer.num_experts - held)
            active -= per_expert * held - per_expert * top_k
        return {"total": total, "active": active}

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``ids (B, T)`` (context cropped to ``seq_len``).
        ``temperature`` 0 = greedy; ``top_k`` > 0 samples among the k most likely tokens."""
        for _ in range(max_new_tokens):
            logits, _ = self(ids[:, -self.config.seq_len :])
            logits = logits[:, -1, :]
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k > 0:
                    threshold = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < threshold, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            ids = torch.cat((ids, next_id), dim=1)
        return ids


def build_model(config: ModelConfig, vocab_size: int) -> GPT:
    """The default model builder (the trainer takes any callable with this signature, e.g. one that
    also shards experts over a process group)."""
    return GPT(config, vocab_size)


def compile_blocks(model: nn.Module) -> None:
    """``train.compile``: compile every transformer block in place (``nn.Module.compile``), or the
    whole model if it has no ``blocks``. Per block rather than the whole model: the blocks are
    alike, so one compiled graph serves them all, and the MoE layer's data-dependent shapes (the
    kept tokens per expert) break the graph inside a block instead of across the model."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        for block in blocks:
            block.compile()
    else:
        model.compile()

