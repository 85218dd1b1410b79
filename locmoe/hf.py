"""Bring your own model: put :class:`locmoe.MoELayer` into a Hugging Face ``transformers`` MoE model.

For ``transformers`` 5.17–5.23 (the ``hf`` extra):

* :func:`replace_moe_blocks` swaps every sparse MoE block of a Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE or
  DeepSeek-V3 model for a :class:`LocMoEBlock`, which holds a ``MoELayer`` computing with the block's
  own expert weights and a locmoe router. With the router that routes as the model does (``topk`` for
  the softmax blocks, ``deepseek`` for DeepSeek-V3) the swapped model computes the same logits as the
  original up to float32 rounding.
* :func:`export_hf` turns the wrappers back into the model's own blocks where the router has a
  Hugging Face equivalent, so ``save_pretrained``/``from_pretrained`` work as before.
* :func:`save_locmoe` / :func:`load_locmoe` save and rebuild a swapped model with any router.

How a block meets the model (router logits and the model's load-balancing loss, locmoe's router
losses in ``outputs.loss``, the attention mask as token mask, DeepSeek-V3's bias and shared experts),
the weight layouts and what the one copy of the expert weights costs (:func:`weight_copy_bytes`):
design §9.1. Build the optimizer after the swap: one holding the original parameters would keep them
alive. Not done: Mixtral's ``router_jitter_noise`` (a warning says it is ignored).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locmoe.dispatch import LocalDispatcher
from locmoe.experts import GroupedExperts
from locmoe.layer import MoELayer
from locmoe.routing import Router, build_router, register_after_optimizer_step

try:
    import transformers
    from safetensors.torch import load_model, save_model
    from transformers import PreTrainedModel
    from transformers.activations import SiLUActivation
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    from transformers.utils.output_capturing import install_output_capuring_hook
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "locmoe.hf needs Hugging Face transformers 5.17 to 5.23: pip install 'locmoe[hf]'"
    ) from error

__all__ = [
    "LocMoEBlock",
    "RouterLogits",
    "export_hf",
    "load_locmoe",
    "locmoe_aux_loss",
    "locmoe_blocks",
    "register_after_optimizer_step",  # DeepSeek's bias update after each optimiser step (locmoe.routing)
    "replace_moe_blocks",
    "save_locmoe",
    "weight_copy_bytes",
]

# The blocks whose experts are SwiGLU ``gate_up_proj``/``down_proj`` stacks: those that route like
# ``topk`` (softmax over a linear gate, top-k, optional renormalisation, dropless) and DeepSeek-V3's,
# which routes like ``deepseek`` (sigmoid, score-correction bias, group-limited top-k, scaling).
SOFTMAX_BLOCKS: tuple[type[nn.Module], ...] = (
    MixtralSparseMoeBlock,
    Qwen2MoeSparseMoeBlock,
    OlmoeSparseMoeBlock,
    Qwen3MoeSparseMoeBlock,
)
SIGMOID_BLOCKS: tuple[type[nn.Module], ...] = (DeepseekV3MoE,)
SUPPORTED_BLOCKS = SOFTMAX_BLOCKS + SIGMOID_BLOCKS
_AUX_HOOK = "_locmoe_aux_loss_hook"
_MASK_HOOK = "_locmoe_attention_mask_hook"
_ROUTER_LOGITS_KEY = "router_logits"  # the key of the models' OutputRecorder for router logits
ROUTING_FILE = "locmoe_routing.json"
WEIGHTS_FILE = "model.safetensors"
ROUTING_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class HFRouting:
    """How a Hugging Face block routes: ``top_k`` experts of ``num_experts``, renormalised or not; for
    DeepSeek-V3's blocks (``sigmoid``) also its groups and routed scaling factor. ``router`` is the
    locmoe router that routes the same way."""

    num_experts: int
    top_k: int
    renormalize: bool
    sigmoid: bool = False
    num_groups: int = 1
    top_groups: int = 1
    routed_scaling: float = 1.0

    @property
    def router(self) -> str:
        return "deepseek" if self.sigmoid else "topk"

    def topk_options(self) -> dict[str, Any]:
        """The block's ``k`` and renormalisation, dropless: what ``topk`` takes from any block."""
        return {"top_k": self.top_k, "capacity_factor": None, "renormalize": self.renormalize}

    def own_options(self) -> dict[str, Any]:
        """The options with which :attr:`router` routes as the block does."""
        options = self.topk_options()
        if self.sigmoid:
            options.update(num_groups=self.num_groups, top_groups=self.top_groups, routed_scaling=self.routed_scaling)
        return options


def _routing_of(block: nn.Module) -> HFRouting:
    gate = block.gate
    # Mixtral always renormalises and has no flag; the others say it with ``norm_topk_prob``.
    routing = HFRouting(int(gate.num_experts), int(gate.top_k), bool(getattr(gate, "norm_topk_prob", True)))
    if isinstance(block, SIGMOID_BLOCKS):
        routing = dataclasses.replace(routing, sigmoid=True, num_groups=int(gate.num_group),
                                      top_groups=int(gate.topk_group), routed_scaling=float(gate.routed_scaling_factor))
    return routing


class RouterLogits(nn.Module):
    """Identity on the router logits ``(S, n)``: the module the model's router-logit recording hook
    sits on (design §9.1), since a swapped block has none of the model's router classes."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class LocMoEBlock(nn.Module):
    """A Hugging Face sparse MoE block computed by a :class:`locmoe.MoELayer`.

    ``(B, T, d) -> (B, T, d)``, as the decoder layer expects. Holds ``moe`` (the layer), ``router_logits``
    (:class:`RouterLogits`), and for Qwen2-MoE the original ``shared_expert`` and ``shared_expert_gate``.
    ``hf_class`` and ``hf_routing`` remember the block it replaced, for :func:`export_hf`.
    """

    def __init__(
        self,
        moe: MoELayer,
        hf_class: type[nn.Module],
        hf_routing: HFRouting,
        config: Any,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.moe = moe
        self.router_logits = RouterLogits()
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.hf_class = hf_class
        self.hf_routing = hf_routing
        self.config = config
        self._router_probs: torch.Tensor | None = None
        # The model's attention mask of the current forward ((B, T_total), 1 = a real token), set by
        # the model's pre-hook (replace_moe_blocks); padding tokens are then left out of routing.
        self.attention_mask: torch.Tensor | None = None
        moe.router.register_forward_hook(self._keep_router_probs)

    def _keep_router_probs(self, router: nn.Module, args: tuple, plan: Any) -> None:
        """The router's differentiable probabilities of this forward (``MoELayer.last_plan`` holds
        them detached), for the recorded logits."""
        self._router_probs = plan.router_probs

    def _logits(self, flat: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """The router logits to record (design §9.1): the learned gate's, else ``log p`` (for the
        rows ``real`` marks, ``(B·T,)`` bool, when a mask left padding out of routing; padding rows
        get uniform logits)."""
        probs, self._router_probs = self._router_probs, None  # hold no graph between forwards (deepcopy)
        gate = getattr(self.moe.router, "gate", None)
        if isinstance(gate, nn.Linear):
            return nn.functional.linear(flat, gate.weight.to(flat.dtype))
        logits = flat.new_zeros(flat.shape[0], self.moe.num_experts)
        if probs is None:  # a router without probabilities (``hash``): uniform logits
            return logits
        log_probs = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)).to(flat.dtype)
        return log_probs if real is None else logits.masked_scatter(real[:, None].expand_as(logits), log_probs)

    def _token_mask(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """This forward's real tokens (``(B, T)`` bool) from the model's attention mask, or ``None``
        when there is no usable 2-D mask or no padding (decided once per model forward). With a KV
        cache the mask covers the past too: its last ``T`` columns are this forward's tokens."""
        mask = self.attention_mask
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < length:
            return None
        return mask[:, -length:].to(device=hidden_states.device, dtype=torch.bool)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        token_mask = self._token_mask(hidden_states) if hidden_states.dim() == 3 else None
        output = self.moe(hidden_states, token_mask=token_mask)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        self.router_logits(self._logits(flat, None if token_mask is None else token_mask.reshape(-1)))
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            output = output + shared.view_as(output)
        return output

    def extra_repr(self) -> str:
        return f"replaces={self.hf_class.__name__}, hf_routing={self.hf_routing}"


def _refusal(name: str, module: nn.Module) -> str | None:
    """Why ``module`` (an MoE block: it has ``gate`` and ``experts``) cannot be replaced, or ``None``."""
    cls = type(module).__name__
    if not isinstance(module, SUPPORTED_BLOCKS):
        supported = ", ".join(c.__name__ for c in SUPPORTED_BLOCKS)
        return f"{cls} at {name!r} is not a supported MoE block (supported: {supported})"
    act = module.experts.act_fn
    if not isinstance(act, (SiLUActivation, nn.SiLU)):
        return (
            f"{cls} at {name!r} uses the activation {type(act).__name__}; locmoe's experts compute SwiGLU "
            f"(SiLU gate) only"
        )
    return None


def _moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module that looks like an HF sparse MoE block (a ``gate`` and an ``experts`` child)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "gate", None), nn.Module)
        and isinstance(getattr(module, "experts", None), nn.Module)
    ]


def _hooks_installed(model: nn.Module) -> bool:
    """Whether the model already installed its output-recording hooks (they are installed once, on the
    first forward that asks for a recorded output, on the modules present then)."""
    return any(
        getattr(module, "_output_capturing_hooks_installed", False)
        for module in model.modules()
        if isinstance(module, PreTrainedModel)
    )


def _shared_expert(block: nn.Module) -> nn.Module | None:
    """Qwen2-MoE's ``shared_expert`` (sigmoid-gated) or DeepSeek-V3's ``shared_experts`` (ungated)."""
    shared = getattr(block, "shared_expert", None)
    return shared if shared is not None else getattr(block, "shared_experts", None)


def _router_options(router: str, routing: HFRouting, options: dict[str, Any]) -> dict[str, Any]:
    """The router that routes as the model does (``topk`` for softmax blocks, ``deepseek`` for
    DeepSeek-V3's) defaults to the model's routing, so naming it alone reproduces the model; ``topk``
    on a DeepSeek-V3 block takes the model's ``k`` and renormalisation; other routers take their own
    defaults."""
    if router == routing.router:
        return {**routing.own_options(), **options}
    if router == "topk":
        return {**routing.topk_options(), **options}
    return dict(options)


def _build_layer(block: nn.Module, router: str, options: dict[str, Any], copy_gate: bool) -> MoELayer:
    """A ``MoELayer`` with ``block``'s experts (copied into the stacked layout) and a new router."""
    experts_hf = block.experts
    gate_up, down = experts_hf.gate_up_proj, experts_hf.down_proj
    num_experts, two_f, d_model = gate_up.shape
    d_ff = two_f // 2
    device, dtype = gate_up.device, gate_up.dtype
    built: Router = build_router(router, d_model, num_experts, **options).to(device=device, dtype=dtype)
    gate = getattr(built, "gate", None)
    if copy_gate and isinstance(gate, nn.Linear) and gate.weight.shape == block.gate.weight.shape:
        with torch.no_grad():
            gate.weight.copy_(block.gate.weight)
            correction = getattr(block.gate, "e_score_correction_bias", None)
            if correction is not None and hasattr(built, "score_bias"):  # DeepSeek-V3's balancing state
                built.score_bias.copy_(correction)
    # gate_up_proj[e] = [W_gate[e]ᵀ; W_in[e]ᵀ] (f rows each); down_proj[e] = W_out[e]ᵀ. from_weights makes
    # the contiguous (transposed) copies, the one copy of the swap (design §9.1).
    experts = GroupedExperts.from_weights(
        w_in=gate_up[:, d_ff:].transpose(1, 2),
        w_out=down.transpose(1, 2),
        w_gate=gate_up[:, :d_ff].transpose(1, 2),
        backend="auto",
    )
    layer = MoELayer.from_parts(built, LocalDispatcher("pack", "local"), experts)
    return layer.to(device)


def _aux_loss_hook(module: nn.Module, args: tuple, output: Any) -> None:
    """Add the locmoe router losses to ``outputs.loss`` (training mode, when a loss was computed)."""
    if not module.training or getattr(output, "loss", None) is None:
        return
    output.loss = output.loss + locmoe_aux_loss(module).to(output.loss.device)


def _remember_attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Hand the model's ``attention_mask`` (keyword or second positional argument) to its locmoe
    blocks, so padding tokens use no capacity and enter no router loss (:meth:`LocMoEBlock.forward`)."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    # One look at the mask per model forward (a host synchronisation), not one per block: no padding
    # means no mask.
    mask = mask if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()) else None
    for _, block in locmoe_blocks(module):
        block.attention_mask = mask


def replace_moe_blocks(
    model: nn.Module,
    router: str = "locmoe_plus",
    *,
    copy_gate: bool = True,
    add_aux_loss: bool = True,
    **options: Any,
) -> list[str]:
    """Replace every sparse MoE block of ``model`` by a :class:`LocMoEBlock`; the replaced blocks' names.

    Args:
        model: a Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE or DeepSeek-V3 model (``...ForCausalLM`` or the
            bare model).
        router: a name from :func:`locmoe.available_routers`.
        copy_gate: start a learned-gate router (``topk``, ``switch``, ``deepseek``, ...) from the block's
            trained gate (and DeepSeek-V3's correction bias), so it keeps the model's expert preferences;
            GrAP routers (``locmoe``, ``locmoe_plus``, ``tcr``, ``ecr``) have a fixed gate and do not use it.
        add_aux_loss: add locmoe's router losses to ``outputs.loss`` in training (design §9.1).
        options: router options (the router's ``Options`` class). For ``topk`` the omitted ones among
            ``top_k``, ``capacity_factor`` and ``renormalize`` default to the model's routing
            (``num_experts_per_tok``, dropless, ``norm_topk_prob`` or ``True`` for Mixtral). ``topk``'s
            own load-balance loss (``aux_coef``, default 0.01) then comes on top of the model's
            ``output_router_logits`` loss in training; ``aux_coef=0`` trains exactly as the model would.
            On a DeepSeek-V3 model ``deepseek`` likewise defaults to its ``top_k``, groups, scaling and
            renormalisation (dropless).

    Every block is checked before any is replaced; a block that cannot be replaced (an unknown MoE
    block, a non-SiLU expert) raises ``ValueError`` naming its class.
    Mixtral's ``router_jitter_noise`` is not reproduced (a warning says so).
    """
    blocks = _moe_blocks(model)
    for name, block in blocks:
        reason = _refusal(name, block)
        if reason is not None:
            raise ValueError(reason)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no Hugging Face sparse MoE block to replace (already replaced?)"
        )
    names = [name for name, _ in blocks]
    del blocks  # hold each original block only while it is copied
    replaced = []
    for name in names:
        block = model.get_submodule(name)
        if getattr(block, "jitter_noise", 0.0):
            warnings.warn(
                f"{name}: router_jitter_noise={block.jitter_noise} is not reproduced by the locmoe block",
                stacklevel=2,
            )
        routing = _routing_of(block)
        layer = _build_layer(block, router, _router_options(router, routing, options), copy_gate)
        wrapper = LocMoEBlock(
            layer,
            type(block),
            routing,
            getattr(block, "config", None) or getattr(model, "config", None),
            shared_expert=_shared_expert(block),
            shared_expert_gate=getattr(block, "shared_expert_gate", None),
        )
        # The model's own recording hooks never reach this module (they match router classes): ours.
        install_output_capuring_hook(wrapper.router_logits, _ROUTER_LOGITS_KEY, 0)
        model.set_submodule(name, wrapper)
        del block  # the original experts are freed here, one block at a time
        replaced.append(name)
    if add_aux_loss and not hasattr(model, _AUX_HOOK):
        setattr(model, _AUX_HOOK, model.register_forward_hook(_aux_loss_hook))
    if not hasattr(model, _MASK_HOOK):
        setattr(model, _MASK_HOOK, model.register_forward_pre_hook(_remember_attention_mask, with_kwargs=True))
    return replaced


def locmoe_blocks(model: nn.Module) -> list[tuple[str, LocMoEBlock]]:
    """The :class:`LocMoEBlock` modules of ``model`` with their names."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LocMoEBlock)]


def locmoe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the locmoe router losses (``MoELayer.aux_loss``) of the last forward, over all
    swapped blocks; a scalar that back-propagates into the routers."""
    losses = [block.moe.aux_loss for _, block in locmoe_blocks(model)]
    if not losses:
        return torch.zeros(())
    device = losses[0].device
    return sum((loss.to(device) for loss in losses), torch.zeros((), device=device))


def _export_refusal(name: str, block: LocMoEBlock) -> str | None:
    """Why ``block``'s router has no equivalent in the block it replaced, or ``None``."""
    router, routing = block.moe.router, block.hf_routing
    cls = block.hf_class.__name__
    if router.name != routing.router:
        how = ("by sigmoid scores with a correction bias, group-limited top-k, routed scaling (router 'deepseek')"
               if routing.sigmoid else "by softmax top-k over a linear gate, dropless (router 'topk')")
        return (
            f"{name!r}: router {router.name!r} has no Hugging Face equivalent ({cls} routes {how}); save it with "
            f"locmoe.hf.save_locmoe, or retrain with router={routing.router!r}"
        )
    opts = router.options
    if opts.capacity_factor is not None:
        return f"{name!r}: {router.name} with capacity_factor={opts.capacity_factor} drops tokens; {cls} is dropless"
    for option, value in routing.own_options().items():
        if option != "capacity_factor" and getattr(opts, option) != value:
            return (f"{name!r}: {router.name} with {option}={getattr(opts, option)}, but {cls} routes with "
                    f"{option}={value} (the model's config)")
    return None


def _hf_block(block: LocMoEBlock) -> nn.Module:
    """The block of ``block.hf_class`` computing the same function, weights copied back."""
    experts = block.moe.experts
    with torch.device("meta"):  # every tensor is assigned below: no allocation, no RNG draw
        restored = block.hf_class(block.config)
    with torch.no_grad():
        restored.gate.weight = nn.Parameter(block.moe.router.gate.weight.detach().clone())
        n, d, f = experts.w_in.shape
        gate_up = experts.w_in.new_empty(n, 2 * f, d)  # filled in place: no concatenated temporary
        gate_up[:, :f].copy_(experts.w_gate.transpose(1, 2))
        gate_up[:, f:].copy_(experts.w_in.transpose(1, 2))
        restored.experts.gate_up_proj = nn.Parameter(gate_up)
        restored.experts.down_proj = nn.Parameter(experts.w_out.transpose(1, 2).contiguous())
    if block.hf_routing.sigmoid:
        restored.gate.e_score_correction_bias = block.moe.router.score_bias.detach().clone()
        restored.shared_experts = block.shared_expert
    elif block.shared_expert is not None:
        restored.shared_expert = block.shared_expert
        restored.shared_expert_gate = block.shared_expert_gate
    left = [name for name, tensor in (*restored.named_parameters(), *restored.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"{block.hf_class.__name__}: no weights to restore {left}")
    return restored


def export_hf(model: nn.Module) -> nn.Module:
    """Put the model's own blocks back in place of the :class:`LocMoEBlock` wrappers (in place; returns
    ``model``), so ``save_pretrained`` writes a standard checkpoint that ``from_pretrained`` loads.

    Only the router that routes as the original block does has an equivalent: ``topk`` with its
    ``top_k``, dropless, its renormalisation; on DeepSeek-V3, ``deepseek`` with its ``top_k``, groups,
    renormalisation and scaling, dropless (the trained correction bias goes back into the block). Any
    other raises ``ValueError`` saying why (and pointing to :func:`save_locmoe`), before anything is
    changed. locmoe's router losses are training-time terms and have no place in the exported model.
    """
    blocks = locmoe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no locmoe block to export")
    for name, block in blocks:
        reason = _export_refusal(name, block)
        if reason is not None:
            raise ValueError(reason)
    hooked = _hooks_installed(model)
    for name, block in blocks:
        restored = _hf_block(block)
        if hooked:  # the model hooks its router classes once; a router added afterwards needs its hook
            install_output_capuring_hook(restored.gate, _ROUTER_LOGITS_KEY, 0)
        model.set_submodule(name, restored)
    for hook in (_AUX_HOOK, _MASK_HOOK):
        handle = getattr(model, hook, None)
        if handle is not None:
            handle.remove()
            delattr(model, hook)
    return model


def save_locmoe(model: nn.Module, folder: str | Path) -> Path:
    """Save a swapped model whatever its router, so :func:`load_locmoe` rebuilds it in a fresh process.

    Writes ``folder/config.json`` (the model's own Hugging Face config, ``save_pretrained``'s),
    ``folder/locmoe_routing.json`` (the router's name and every option it runs with, the model class,
    the swapped blocks' names) and ``folder/model.safetensors`` (every parameter and persistent buffer:
    the experts in locmoe's stacked layout, the learned gates, the routers' state such as LocMoE+'s
    capacity EMA or LocMoE's fixed capacity; tied weights once). For a ``topk`` router that routes as
    the model did, :func:`export_hf` + ``save_pretrained`` is the standard alternative.
    ``ValueError`` if the blocks route differently from one another (one router per model is what
    :func:`replace_moe_blocks` builds)."""
    blocks = locmoe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no locmoe block to save; use save_pretrained")
    routers = {(block.moe.router.name, json.dumps(block.moe.router.options.as_dict(), sort_keys=True))
               for _, block in blocks}
    if len(routers) != 1:
        raise ValueError(f"the locmoe blocks route differently ({sorted(routers)}); save_locmoe keeps one router "
                         "per model")
    (router, options), = routers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS_FILE))
    routing = {"format": ROUTING_FORMAT, "model_class": type(model).__name__, "router": router,
               "options": json.loads(options), "blocks": [name for name, _ in blocks],
               "add_aux_loss": hasattr(model, _AUX_HOOK), "dtype": str(model.dtype).removeprefix("torch.")}
    (folder / ROUTING_FILE).write_text(json.dumps(routing, indent=1) + "\n")
    return folder


def load_locmoe(folder: str | Path) -> nn.Module:
    """The model :func:`save_locmoe` wrote to ``folder``: built from its config (no download) in the
    saved model's dtype, its blocks swapped with the saved router and options, every saved tensor
    loaded strictly; in eval mode. ``ValueError`` naming what is missing or does not fit."""
    folder = Path(folder)
    routing_path = folder / ROUTING_FILE
    if not routing_path.is_file():
        raise ValueError(f"{folder} holds no {ROUTING_FILE}; it was not written by locmoe.hf.save_locmoe")
    routing = json.loads(routing_path.read_text())
    if routing.get("format") != ROUTING_FORMAT:
        raise ValueError(f"{routing_path}: format {routing.get('format')!r}, this locmoe reads {ROUTING_FORMAT}")
    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = getattr(transformers, routing["model_class"], None)
    if model_class is None:
        raise ValueError(f"{routing_path}: transformers has no model class {routing['model_class']!r}")
    dtype = getattr(torch, str(routing.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{routing_path}: dtype {routing.get('dtype')!r} is not a torch dtype")
    # Built in the saved dtype (its random initial weights are overwritten below); the routers' state
    # buffers keep their own dtype (Router.state_buffers).
    model = model_class._from_config(config, dtype=dtype)
    swapped = replace_moe_blocks(model, routing["router"], copy_gate=False, add_aux_loss=routing["add_aux_loss"],
                                 **routing["options"])
    if swapped != routing["blocks"]:
        raise ValueError(f"{folder}: the config builds MoE blocks {swapped}, the saved model had {routing['blocks']}")
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def weight_copy_bytes(num_experts: int, d_model: int, d_ff: int, bytes_per_weight: int) -> int:
    """Bytes of expert weights one block's copy writes (``3·n·d·f`` weights); design §9.1 works this
    out for Mixtral-8x7B."""
    return 3 * num_experts * d_model * d_ff * bytes_per_weight

