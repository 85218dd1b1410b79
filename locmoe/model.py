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
identity. Routers keep their own initialisation scheme (a learned gate: ``nn.Linear``'s default).

Paired initialisation (ours, design §6.10): a seed gives every router the same non-router weights.
The global RNG state at construction is restored before :meth:`GPT.reset_parameters` draws the
non-router weights, so whatever the routers drew while being built (a learned gate draws, a GrAP
router draws nothing) cannot shift them; then one router seed is drawn from the global RNG and each
MoE layer's router parameters are redrawn from their own generator seeded from ``(router seed,
layer index)`` (:func:`router_generator`). Runs of two router families with one seed therefore start
from equal non-router tensors, which :func:`init_fingerprint` hashes.

Generation (:meth:`GPT.generate`) decodes with a :class:`KVCache` by default: the prompt is run once
(the prefill, the very computation of ``features``), then each new token alone attends to the cached
keys and values of the positions before it, and each MoE layer routes that token alone (a routing
group of one token per sequence). The decoding options (temperature, top-k, top-p) are
:func:`filter_logits` and :func:`sample_next`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from locmoe.config import ModelConfig
from locmoe.dispatch import LocalDispatcher
from locmoe.layer import MoELayer, metric_tensors, read_metrics
from locmoe.routing import available_routers, router_class
from locmoe.validation import check_integer, check_number

LOSS_CHUNK_TOKENS = 512  # rows of the output projection per softmax chunk in GPT.loss (speed only)

# The routers that decode with the KV cache (each new token routed alone gets the experts it would get
# in a group), and why the others may not (GPT.kv_cache_blocker reports it; generate then recomputes the
# context): each router class says so itself (Router.alone_differs).
KV_CACHE_ROUTERS = tuple(name for name in available_routers() if router_class(name).alone_differs is None)
NO_KV_CACHE_REASONS = {name: router_class(name).alone_differs for name in available_routers()
                       if router_class(name).alone_differs is not None}
# A nucleus whose probability mass falls short of top_p by at most this much counts as reaching it
# (float rounding of the running sum, e.g. 0.5 + 0.3 vs 0.8, must not add one more token).
_TOP_P_SLACK = 1e-6


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles ``θ_{t,j} = t · base^(−2j/head_dim)``: ``cos, sin`` each ``(seq_len, head_dim/2)``."""
    inverse_frequency = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inverse_frequency)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head: ``x (..., hd)`` with tables broadcastable to ``(..., hd/2)``."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class LayerKVCache:
    """The keys and values one attention layer computed for positions ``0 .. length-1`` of a batch.

    Storage ``(B, H, max_length, hd)`` is allocated at the first :meth:`append` (its batch, heads,
    dtype and device come from the first keys), so appending one token costs a copy of one row, not
    of the whole past.
    """

    def __init__(self, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length={max_length!r} is invalid; allowed: an integer >= 1")
        self.max_length = max_length
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys, values (B, H, T, hd)`` at positions ``length .. length+T-1``; returns views of
        every stored position ``(B, H, length+T, hd)`` (valid until the next append)."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; cannot append {keys.shape[2]} "
                             f"to the {start} it has")
        if self.keys is None or self.values is None:
            shape = (*keys.shape[:2], self.max_length, keys.shape[3])
            self.keys = keys.new_empty(shape)
            self.values = values.new_empty(shape)
        elif keys.shape[:2] != self.keys.shape[:2] or keys.shape[3] != self.keys.shape[3]:
            raise ValueError(f"keys of shape {tuple(keys.shape)} do not fit a KV cache of shape "
                             f"{tuple(self.keys.shape)} (batch, heads, positions, head size)")
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


@dataclass
class KVCache:
    """One :class:`LayerKVCache` per transformer block (:meth:`GPT.new_kv_cache`); ``length`` is the
    number of positions every layer holds, i.e. the position the next token takes."""

    layers: list[LayerKVCache] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``(B, T, d) -> (B, T, d)``.

    With a :class:`LayerKVCache` holding ``P`` earlier positions, the ``T`` tokens of ``x`` are
    positions ``P .. P+T-1`` (their rotary angles are those positions'), their keys and values are
    appended to the cache, and each attends to every cached position up to its own. With an empty
    cache (the prefill) the computation is exactly the one without a cache.
    """

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

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        start = 0 if cache is None else cache.length  # position of x's first token
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).unbind(dim=2)  # (B, T, H, hd)
        if self.rotary:
            # Rotated in the (B, T, H, hd) layout, where q and k are dense rows: much faster on CPU.
            cos, sin = self.rope_cos[start : start + length, None, :], self.rope_sin[start : start + length, None, :]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        dropout = self.dropout if self.training else 0.0
        if cache is not None:
            keys, values = cache.append(k, v)
            if start > 0:  # attend to the cached past too (with no cache, or a prefill: as below)
                attended = self._attend_cached(q, keys, values, start, dropout)
                return self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, width))

    @staticmethod
    def _attend_cached(
        q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, dropout: float
    ) -> torch.Tensor:
        """Queries of positions ``start ..`` over the keys of positions ``0 ..``: one new token sees every
        key (no mask); several see the keys up to their own position (``is_causal`` would align the
        mask's corners, i.e. wrongly, when there are more keys than queries)."""
        length = q.shape[2]
        if length == 1:
            return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout)
        positions = torch.arange(keys.shape[2], device=q.device)
        visible = positions[None, :] <= positions[start:, None]  # (T, P+T)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, dropout_p=dropout)


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

    def decode(self, x: torch.Tensor, token_ids: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
        """:meth:`forward` for the tokens after those in ``cache`` (:meth:`GPT.extend`).

        One new token per sequence (``x (B, 1, d)``) is routed alone (:func:`_route_alone`): each
        sequence's token is its own routing group, as when ``B = 1``, so no token's experts or capacity
        depend on another sequence's. Several tokens (the prefill) are routed together, as
        :meth:`forward` routes them.
        """
        x = x + self.dropout(self.attn(self.norm_attn(x), cache))
        normed = self.norm_ffn(x)
        if not isinstance(self.ffn, MoELayer):
            ffn_out = self.ffn(normed)
        elif normed.shape[1] == 1:
            batch = range(x.shape[0])
            rows = [_route_alone(self.ffn, normed[row : row + 1], token_ids[row : row + 1]) for row in batch]
            ffn_out = rows[0] if len(rows) == 1 else torch.cat(rows)
        else:
            ffn_out = self.ffn(normed, token_ids=token_ids)
        return x + self.dropout(ffn_out)


def _route_alone(layer: MoELayer, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``layer`` on one token ``x (1, 1, d)``, its own routing group, computed with ``pack`` dispatch.

    Why pack: ``pad`` runs every expert on ``C`` rows, and a group of one token has ``C >= 1``, so
    ``n - k`` experts would compute zero rows, i.e. read their weights for nothing (the larger part of
    a decoding step's cost). The layer's two dispatch modes give the same output by contract; only
    the ``processed_slots`` metric of this forward counts the kept slots instead of ``n · C``.
    """
    dispatcher = layer.dispatcher
    if not isinstance(dispatcher, LocalDispatcher) or dispatcher.mode == "pack":
        return layer(x, token_ids=token_ids)
    mode, dispatcher.mode = dispatcher.mode, "pack"
    try:
        return layer(x, token_ids=token_ids)
    finally:
        dispatcher.mode = mode


class GPT(nn.Module):
    """GPT-style decoder: ``ids (B, T) -> (logits (B, T, V), aux_loss ())``."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid; allowed: a positive integer")
        rng_state = torch.get_rng_state()
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
        torch.set_rng_state(rng_state)  # what the modules drew while being built must not shift the init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every weight: the non-router ones from the global RNG in a fixed order that no router
        changes, then each MoE layer's router parameters from :func:`router_generator` (module
        docstring, paired initialisation)."""
        self._reset_non_router_parameters()
        router_seed = int(torch.randint(0, 2**62, (1,)).item())
        for index, block in enumerate(self.blocks):
            if isinstance(block.ffn, MoELayer):
                reset_router_parameters(block.ffn.router, router_generator(router_seed, index))

    def _reset_non_router_parameters(self) -> None:
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

    def routing_metric_tensors(self) -> dict[str, dict[str, object]]:
        """:meth:`routing_metrics` before the host copy (:func:`locmoe.layer.metric_tensors`): a snapshot
        of the last forward's metrics taken without a device synchronisation."""
        return metric_tensors(self.moe_layers)

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

    def kv_cache_blocker(self) -> str | None:
        """Why :meth:`generate` cannot decode this model with a KV cache, or ``None`` if it can.

        The cache routes each new token alone through every MoE layer; that is the router's own
        decision for the token only for the token-choice routers (:attr:`Router.alone_differs` is
        ``None``; :data:`KV_CACHE_ROUTERS`). The
        expert-choice routers (``expert_choice``, ``ecr``) cannot decode one token at a time: an
        expert picks tokens by comparing them with the others of the group (later ones included), and a
        lone token would be picked by every expert; they keep the full recompute.
        """
        for name, layer in self.moe_layers.items():
            why = layer.router.alone_differs
            if why is not None:
                return f"router {layer.router.name!r} ({name}) cannot decode one token at a time: {why}"
        return None

    def new_kv_cache(self) -> KVCache:
        """An empty cache for :meth:`extend`, one layer per block, ``seq_len`` positions long."""
        return KVCache([LayerKVCache(self.config.seq_len) for _ in self.blocks])

    def _extend_hidden(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """:meth:`features` (without the aux loss) of the new tokens ``ids (B, T)`` at positions
        ``cache.length ..``; their keys and values are appended to ``cache``."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (batch, time), got {tuple(ids.shape)}")
        start, length = cache.length, ids.shape[1]
        if start + length > self.config.seq_len:
            raise ValueError(f"positions up to {start + length} exceed the model's seq_len={self.config.seq_len}")
        x = self.token_embedding(ids)
        if self.position_embedding is not None:
            x = x + self.position_embedding.weight[start : start + length]
        x = self.dropout(x)
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x = block.decode(x, ids, layer_cache)
        return self.norm_out(x)

    def extend(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits ``(B, T, V)`` of ``ids (B, T)``, the tokens that follow the ``cache.length`` positions in
        ``cache`` (from :meth:`new_kv_cache`; updated in place). On an empty cache this is ``forward``
        (the same computation); after it, one token per sequence at a time is routed alone in each MoE
        layer (:meth:`Block.decode`). Positions must stay below ``seq_len``."""
        return self.lm_head(self._extend_hidden(ids, cache))

    def _next_logits(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Logits ``(B, V)`` of the token after ``ids``: from the cache where it holds all but the last
        token and ``ids`` fits in ``seq_len``, else by recomputing the last ``seq_len`` tokens."""
        window = self.config.seq_len
        if cache is not None and ids.shape[1] <= window:
            new = ids if cache.length == 0 else ids[:, cache.length :]
            return self.lm_head(self._extend_hidden(new, cache)[:, -1])
        hidden, _ = self.features(ids[:, -window:])
        return self.lm_head(hidden[:, -1])

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        *,
        top_p: float = 1.0,
        seed: int | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor:
        """``ids (B, T)`` followed by ``max_new_tokens`` sampled tokens: ``(B, T + max_new_tokens)``.

        Decoding (:func:`sample_next`): ``temperature`` 0 = greedy (argmax), else the logits are divided
        by it, cut to the ``top_k`` most likely tokens (0 = off) and to the nucleus of probability
        ``top_p`` (1 = off), and sampled with ``generator``, or a fresh one seeded with ``seed``, or
        (neither given) torch's global one.

        ``use_cache``: ``True`` decodes with a :class:`KVCache` (prefill the prompt once, then one token
        per step attending to the cached keys and values), ``False`` recomputes the whole context for
        every token (the path before the cache existed), ``None`` (default) uses the cache unless
        :meth:`kv_cache_blocker` says the model cannot (``True`` then raises ``ValueError`` saying why).

        The cache changes no computation but the MoE routing group: with it, each new token is routed
        alone; the full recompute routes the whole context as one group every step. The two agree (the
        same greedy tokens; logits equal up to float rounding of differently shaped products, within
        ``1e-5`` absolute plus ``1e-4`` relative in float32) whenever the full recompute drops no token
        (a dropless router, or capacities no group fills). Where capacity drops tokens they can differ:
        a capacity-bound forward drops a token depending on its neighbours, later ones included, so it
        has no one-token-at-a-time form; the cached path is then the router's decision for each token
        without contention.

        Context longer than ``seq_len`` (as before the cache): a sliding window, the last ``seq_len``
        tokens, recomputed every step; the cache serves the steps up to ``seq_len`` tokens of
        context, as the window's positions (and so every cached key) shift once it slides.

        The model runs in eval mode (no dropout, and routers neither fix nor update capacities from
        the prompt) and is put back in its former mode afterwards.
        """
        check_integer("max_new_tokens", max_new_tokens, low=0)
        check_sampling_options(temperature, top_k, top_p)
        if seed is not None:
            check_integer("seed", seed, low=0)
            if generator is not None:
                raise ValueError("give generator or seed, not both")
            generator = torch.Generator(device=ids.device).manual_seed(seed)
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise ValueError(f"ids must have shape (batch, time) with time >= 1, got {tuple(ids.shape)}")
        blocker = self.kv_cache_blocker()
        if use_cache and blocker is not None:
            raise ValueError(f"use_cache=True: {blocker}; decode with use_cache=False")
        cache = self.new_kv_cache() if (use_cache is None and blocker is None) or use_cache else None
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self._next_logits(ids, cache)
                next_id = sample_next(logits, temperature, top_k, top_p, generator)
                ids = torch.cat((ids, next_id), dim=1)
        finally:
            self.train(was_training)
        return ids


def check_sampling_options(temperature: float, top_k: int, top_p: float) -> None:
    """``ValueError`` naming the value and what is allowed unless ``temperature`` is a finite number
    ``>= 0``, ``top_k`` an integer ``>= 0`` and ``top_p`` a number in ``(0, 1]``."""
    check_number("temperature", temperature, low=0.0)
    check_integer("top_k", top_k, low=0)
    check_number("top_p", top_p, low=0.0, high=1.0, low_open=True)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits (..., V)`` with every token outside the candidates set to ``-inf``.

    * ``top_k`` > 0: the ``k`` largest logits are candidates, and any tied with the ``k``-th.
    * ``top_p`` < 1 (nucleus, Holtzman et al. 2020): of those, the fewest most likely tokens whose
      probability (softmax over the candidates left by top-k) sums to at least ``top_p``: a token is
      kept when the mass of the tokens ranked above it is below ``top_p`` (so the most likely one
      always is; equal logits rank by token id, lower first; a shortfall within 1e-6 counts as reached).

    The two compose in this order; 0 and 1 switch each off.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        ranked, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probabilities = torch.softmax(ranked.double(), dim=-1)
        mass_before = torch.cumsum(probabilities, dim=-1) - probabilities
        outside_ranked = mass_before >= top_p - _TOP_P_SLACK
        outside_ranked[..., 0] = False
        outside = torch.zeros_like(outside_ranked).scatter(-1, order, outside_ranked)
        logits = logits.masked_fill(outside, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token ``(B, 1)`` from the logits ``(B, V)`` of the last position: the argmax for
    ``temperature`` 0 (no random draw), else one draw from ``softmax(filter_logits(logits / T))``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(F.softmax(filtered, dim=-1), 1, generator=generator)


def router_generator(router_seed: int, layer_index: int) -> torch.Generator:
    """The CPU generator of the router parameters of block ``layer_index``: seeded from a hash of
    ``(router_seed, layer_index)``, so every layer's gate has its own stream, independent of the
    non-router weights and of how many values any other module drew (ours)."""
    digest = hashlib.sha256(f"router:{router_seed}:{layer_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def reset_router_parameters(router: nn.Module, generator: torch.Generator) -> None:
    """Redraw ``router``'s parameters from ``generator`` with ``nn.Linear``'s default scheme (every
    learned gate here is an ``nn.Linear``: weight uniform in ``±1/sqrt(fan_in)``, bias likewise).
    Drawn on the CPU then copied, so the values do not depend on the device the model is built on."""
    for module in router.modules():
        if isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.in_features)
            for parameter in (module.weight, module.bias):
                if parameter is not None:
                    drawn = torch.empty(parameter.shape, dtype=torch.float32)
                    drawn.uniform_(-bound, bound, generator=generator)
                    parameter.copy_(drawn.to(parameter.dtype))
        elif any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"router module {type(module).__name__} has parameters that are not an nn.Linear's; "
                             "reset_router_parameters cannot draw them")


def router_parameter_names(model: nn.Module) -> set[str]:
    """The names (``named_parameters``) of every router parameter of ``model``'s MoE layers."""
    return {name for name, _ in model.named_parameters() if ".router." in f".{name}"}


def init_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex, first 16 digits) of ``model``'s non-router parameters, by name in sorted order,
    each as float64 bytes: equal for two models exactly when their non-router weights are equal. A
    run records it at build time (``summary.json``'s ``init_fingerprint``); the comparison pairs two
    runs by seed only when their fingerprints (and data order) match (ours)."""
    routers = router_parameter_names(model)
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name in routers:
            continue
        digest.update(name.encode())
        digest.update(str(tuple(parameter.shape)).encode())
        digest.update(parameter.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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

