"""Run configuration: frozen, validated dataclasses that map 1:1 to TOML keys and command-line flags.

A run is ``RunConfig(out, model, data, train, parallel)``. Every field of the sections has a unique
name, so ``--d-model 128`` on the command line, ``d_model = 128`` under ``[model]`` in a TOML file
and ``ModelConfig(d_model=128)`` in Python are the same setting. Each ``__post_init__`` rejects a
bad value with a ``ValueError`` that names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locmoe.device import PRECISIONS, check_device_text
from locmoe.dispatch import DISPATCH_MODES, ROUTING_SCOPES, check_routing_scope
from locmoe.experts import ACTIVATIONS, available_backends
from locmoe.routing import RouterOptions, available_routers, make_options, router_class
from locmoe.validation import config_choice, config_integer, config_number, invalid, is_finite_number, is_integer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

POSITIONS = ("rotary", "learned")
CAPACITY_WORDS = ("default", "dropless")
SIMULATED_PLACEMENTS = ("rows", "corpus")
INIT_ROUTER_MODES = ("matching", "fresh")


@dataclass(frozen=True)
class ModelConfig:
    """The GPT-style decoder and its MoE layers (see :mod:`locmoe.model`).

    ``moe_every = k`` makes the FFN of every k-th block (blocks k, 2k, ... counting from 1) a
    ``MoELayer``; 0 makes every block dense. ``capacity_factor`` is a positive number, ``"default"``
    (each router's default) or ``"dropless"`` (``topk`` only). ``router_options`` go to the
    router unchanged (e.g. ``{"tau": 0.9}``; each router's ``Options`` class lists them) and
    are checked here; ``top_k = None`` is the router's own default. ``routing_scope`` is
    ``"local"`` (each rank routes its own tokens) or ``"global"`` (all tokens of the expert-parallel
    group form one routing group, design §2 step 6; in one process both are the whole batch).
    ``experts_backend`` computes the experts (:mod:`locmoe.experts`): ``"auto"`` picks the grouped-GEMM
    backend on CUDA where it can run, else ``"fused"``.
    """

    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 768
    seq_len: int = 128
    positions: str = "rotary"
    rope_base: float = 10000.0
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    moe_every: int = 2
    num_experts: int = 8
    router: str = "locmoe_plus"
    top_k: int | None = None
    capacity_factor: float | str = "default"
    activation: str = "gelu"
    dispatch: str = "pad"
    routing_scope: str = "local"
    experts_backend: str = "auto"
    ch_interval: int = 0
    router_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len", "num_experts"):
            config_integer(f"model.{name}", getattr(self, name), 1)
        if self.d_model % self.n_heads:
            invalid("model.n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        config_choice("model.positions", self.positions, POSITIONS)
        if self.positions == "rotary" and (self.d_model // self.n_heads) % 2:
            invalid("model.n_heads", self.n_heads, "a value giving an even head size (d_model / n_heads) for rotary")
        config_number("model.rope_base", self.rope_base, 1.0, 1e12, open_low=True)
        config_number("model.dropout", self.dropout, 0.0, 0.99)
        config_number("model.norm_eps", self.norm_eps, 0.0, 1.0, open_low=True)
        config_number("model.init_std", self.init_std, 0.0, 1.0, open_low=True)
        config_integer("model.moe_every", self.moe_every, 0)
        if self.moe_every > self.n_layers:
            invalid("model.moe_every", self.moe_every,
                  f"0 (a dense model) or an integer in [1, n_layers={self.n_layers}]: larger gives no MoE layer")
        config_choice("model.router", self.router, available_routers())
        if self.top_k is not None:
            config_integer("model.top_k", self.top_k, 1)
            if self.top_k > self.num_experts:
                invalid("model.top_k", self.top_k, f"an integer in [1, num_experts={self.num_experts}]")
        if isinstance(self.capacity_factor, str):
            config_choice("model.capacity_factor", self.capacity_factor, CAPACITY_WORDS)
        elif not is_finite_number(self.capacity_factor) or self.capacity_factor <= 0:
            invalid("model.capacity_factor", self.capacity_factor, "a positive number, 'default' or 'dropless'")
        config_choice("model.activation", self.activation, ACTIVATIONS)
        config_choice("model.dispatch", self.dispatch, DISPATCH_MODES)
        config_integer("model.ch_interval", self.ch_interval, 0)
        if not isinstance(self.router_options, dict) or not all(isinstance(k, str) for k in self.router_options):
            invalid("model.router_options", self.router_options, "a table of option names to values")
        for own in ("capacity_factor", "top_k"):
            if own in self.router_options:
                invalid(f"model.router_options.{own}", self.router_options[own],
                      f"nothing: {own} is a field of its own (model.{own}, --{own.replace('_', '-')})")
        config_choice("model.routing_scope", self.routing_scope, ROUTING_SCOPES)
        config_choice("model.experts_backend", self.experts_backend, ("auto", *available_backends()))
        # A private copy: the frozen config must not change when the caller's dict does.
        object.__setattr__(self, "router_options", dict(self.router_options))
        try:
            settings = self.router_settings()
        except ValueError as error:
            raise ValueError(f"model.router_options for router {self.router!r}: {error}") from None
        scope = router_class(self.router).scope_of(settings)
        try:
            check_routing_scope(self.routing_scope, scope)
        except ValueError:
            invalid("model.routing_scope", self.routing_scope,
                    f"local, or global with the router's scope='batch' (it is {scope!r})")

    def router_keywords(self) -> dict[str, Any]:
        """The router options as keywords for ``MoELayer``/``build_router``: ``router_options`` plus
        the capacity factor, where the text form says something (``"default"`` = leave the router's
        default, ``"dropless"`` = ``None``)."""
        options = dict(self.router_options)
        if self.capacity_factor == "dropless":
            options["capacity_factor"] = None
        elif self.capacity_factor != "default":
            options["capacity_factor"] = float(self.capacity_factor)
        return options

    def router_settings(self) -> RouterOptions:
        """The typed options every MoE layer's router runs with, size-dependent defaults resolved."""
        options = make_options(self.router, self.num_experts, self.top_k, **self.router_keywords())
        return options.for_layer(self.d_model, self.num_experts)

    @property
    def moe_layer_indices(self) -> list[int]:
        """0-based indices of the blocks whose FFN is a ``MoELayer``."""
        if self.moe_every == 0:
            return []
        return [i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0]


@dataclass(frozen=True)
class DataConfig:
    """The corpus, its train/validation split and the tokenizer (see :mod:`locmoe.data`).

    ``corpus`` is ``python-docs`` (embedded), ``linux-docs`` / ``linux-docs-networking`` (opt-in,
    fetched into the cache by ``locmoe/data/fetch_linux_docs.sh``) or a path to a text file or folder.
    ``max_chars`` > 0 keeps only the first that many characters (quick runs, tests). The text is cut
    into blocks of about ``split_block_chars`` characters at line ends; a fixed, evenly spread
    ``validation_fraction`` of the blocks is the validation split. ``cache_dir`` empty means
    ``$LOCMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/locmoe``, else ``~/.cache/locmoe``.
    """

    corpus: str = "python-docs"
    cache_dir: str = ""
    vocab_size: int = 8192
    max_chars: int = 0
    validation_fraction: float = 0.05
    split_block_chars: int = 8192
    data_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus:
            invalid("data.corpus", self.corpus, "python-docs, linux-docs, linux-docs-networking or a path")
        if not isinstance(self.cache_dir, str):
            invalid("data.cache_dir", self.cache_dir, "a directory path ('' = the default cache)")
        # 256 byte-level symbols are the floor of a byte-level BPE; 2**31 keeps ids in int32.
        if not is_integer(self.vocab_size) or not 256 <= self.vocab_size < 2**31:
            invalid("data.vocab_size", self.vocab_size, "an integer >= 256")
        config_integer("data.max_chars", self.max_chars, 0)
        config_number("data.validation_fraction", self.validation_fraction, 0.0, 0.5, open_low=True)
        config_integer("data.split_block_chars", self.split_block_chars, 1)
        config_integer("data.data_seed", self.data_seed, 0)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation run (see :mod:`locmoe.train`).

    The learning rate warms up linearly over ``warmup_steps`` and then follows a cosine from ``lr``
    to ``min_lr_ratio · lr`` at ``steps``. ``stop_after`` > 0 ends this invocation after that many
    total steps (with a checkpoint) without changing the schedule, so a later ``--resume`` continues
    the same run. ``eval_every`` / ``checkpoint_every`` = 0 means only at the end. ``eval_batches``
    = 0 evaluates the whole validation split. ``grad_clip`` = 0 disables clipping. ``threads`` = 0
    leaves torch's thread count alone.

    ``init_from``: a run folder (its newest checkpoint) or checkpoint file whose model weights start
    this run (continued training, with a router swap when ``router`` differs; the optimiser, schedule
    and data position start anew). Every weight outside the MoE routers must exist with the same shape
    (anything else is refused before training starts), and the run tokenises its corpus with the
    checkpoint's tokenizer (the embeddings index its vocabulary), so a model pretrained on one corpus
    continues on another (``data.vocab_size`` must be the tokenizer's). ``init_router`` says what
    the routers start from **(ours)**: ``"matching"`` (default) takes every router tensor the
    checkpoint holds under the same name and shape (a ``topk`` run continued as ``topk``, ``switch``
    or ``expert_choice`` keeps its trained gate; a LocMoE+ run keeps its capacity state) and builds the
    rest as this run's router does (the GrAP routers of ``locmoe``/``locmoe_plus`` have no learned
    gate); ``"fresh"`` builds every router tensor anew (design §9). Note that ``locmoe`` continued as
    ``locmoe`` keeps its fixed capacity, which was measured on the source run's routing-group size:
    continue it with ``"fresh"`` when the batch size or sequence length changes.

    ``log_every`` = ``N`` prints a plain line every ``N`` steps (step, loss, lr, tokens/s, mean drop
    rate, validation loss when evaluated) for logs that a progress bar garbles; 0 (default) = every
    10 steps when there is no progress bar to watch (``progress`` false, or stderr not a terminal).

    ``tensorboard``: also write the step scalars as TensorBoard events to ``<run>/tensorboard/``
    (:mod:`locmoe.tensorboard`; when the ``tensorboard`` package is installed; ``metrics.jsonl`` stays
    the record).

    ``grad_accum`` = ``N`` splits each optimiser step's ``batch_size`` sequences into ``N`` micro-batches
    that run forward and backward one after the other, their gradients summed with weight ``1/N``:
    the step's data, schedule and tokens are those of the whole batch, its peak activation memory a
    micro-batch's. The LM loss gradient is the whole batch's (every micro-batch has as many tokens).
    An MoE layer routes each micro-batch as its own routing group: capacities, router losses
    (averaged over the micro-batches) and router state (LocMoE+'s capacity EMA, updated once per
    micro-batch) follow the micro-batch, as they would on ``N`` ranks with local routing scope; the
    logged per-layer metrics sum the micro-batches' counts and average the rest.

    ``device`` (:mod:`locmoe.device`): ``"auto"`` (default: CUDA when available, else the CPU),
    ``"cpu"``, ``"cuda"`` (under ``torchrun`` the GPU of ``LOCAL_RANK``) or ``"cuda:N"``.

    ``precision``: ``"auto"`` (default: bf16 on CUDA, float32 on the CPU), ``"float32"`` or
    ``"bfloat16"``, mixed precision by ``torch.autocast`` for the forward passes of training and
    evaluation: matrix products (linear layers, attention, the experts) run in bf16, while the
    weights, their gradients, the optimiser state, norms, softmax, the loss and the routers' logits
    (``routing.base.gate_logits``) stay float32. It pays on hardware with native bf16 (GPUs; CPUs
    with AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower, hence float32 on the CPU.

    ``compile``: wrap every transformer block in ``torch.compile``. ``deterministic``: deterministic
    kernels (``torch.use_deterministic_algorithms``) so a resumed CUDA run repeats an uninterrupted
    one bit for bit (CPU runs are deterministic without it).
    """

    steps: int = 1000
    stop_after: int = 0
    init_from: str = ""
    init_router: str = "matching"
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 250
    eval_batches: int = 32
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    threads: int = 0
    progress: bool = True
    log_every: int = 0
    tensorboard: bool = True
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        config_integer("train.steps", self.steps, 1)
        config_integer("train.stop_after", self.stop_after, 0)
        if not isinstance(self.init_from, str):
            invalid("train.init_from", self.init_from, "a run folder or checkpoint file ('' = a new model)")
        config_choice("train.init_router", self.init_router, INIT_ROUTER_MODES)
        config_integer("train.batch_size", self.batch_size, 1)
        config_integer("train.grad_accum", self.grad_accum, 1)
        if self.batch_size % self.grad_accum:
            invalid("train.grad_accum", self.grad_accum, f"a divisor of batch_size={self.batch_size}")
        config_number("train.lr", self.lr, 0.0, 10.0, open_low=True)
        config_number("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        config_integer("train.warmup_steps", self.warmup_steps, 0)
        config_number("train.weight_decay", self.weight_decay, 0.0, 10.0)
        config_number("train.beta1", self.beta1, 0.0, 0.999999)
        config_number("train.beta2", self.beta2, 0.0, 0.999999)
        config_number("train.adam_eps", self.adam_eps, 0.0, 1.0, open_low=True)
        config_number("train.grad_clip", self.grad_clip, 0.0, 1e6)
        config_integer("train.seed", self.seed, 0)
        config_integer("train.eval_every", self.eval_every, 0)
        config_integer("train.eval_batches", self.eval_batches, 0)
        config_integer("train.checkpoint_every", self.checkpoint_every, 0)
        config_integer("train.keep_checkpoints", self.keep_checkpoints, 1)
        config_integer("train.threads", self.threads, 0)
        config_integer("train.log_every", self.log_every, 0)
        check_device_text(self.device)
        config_choice("train.precision", self.precision, PRECISIONS)
        for name in ("progress", "tensorboard", "compile", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                invalid(f"train.{name}", getattr(self, name), "true or false")


@dataclass(frozen=True)
class ParallelConfig:
    """Expert parallelism under ``torchrun`` and simulated nodes in one process (design §5; see
    :mod:`locmoe.parallel`).

    Under ``torchrun`` (``WORLD_SIZE`` set) the run joins the job: ``expert_parallel`` = ``P`` ranks
    share the experts (0 = all ranks; it must divide the world size and ``num_experts``), the other
    parameters are replicated over all ranks. ``ranks_per_node`` > 0 says how many consecutive ranks
    share a node (to simulate several nodes on one machine); 0 takes ``LOCAL_WORLD_SIZE``. The
    ``hierarchical`` all-to-all (gather within a node, exchange across nodes, scatter within; LocMoE's
    group-wise all-to-all) gives identical results with different traffic. A collective that stalls
    for ``collective_timeout`` seconds fails every rank with an error naming the layer and step.
    Without ``torchrun``, ``expert_parallel`` must be 0 or 1.

    ``simulated_nodes`` = ``N`` > 0 **(ours)**: one process (no ``torchrun``) places its experts
    contiguously on ``N`` simulated nodes (expert ``e`` on node ``e // (n / N)``, as ``N`` ranks
    would hold them) and its tokens on the same nodes, and passes both to the routers: the locality
    loss (design §4) sees that topology and every MoE layer logs ``remote_share`` per step.
    ``simulated_placement`` says where a token lives: ``"rows"`` = the batch rows split into ``N``
    contiguous blocks (exactly what ``N`` single-rank nodes of ``torchrun`` get; rows are i.i.d., so
    no router can lower the remote share below ``1 − 1/N`` in expectation), ``"corpus"`` = the node
    holding the contiguous ``1/N`` shard of the training stream the row's window was taken from (data
    sharded by document, as multi-node loaders shard files), so the data on a node has its own topics
    and the locality loss has something to learn. Neither changes the data order.
    """

    expert_parallel: int = 0
    ranks_per_node: int = 0
    hierarchical: bool = False
    collective_timeout: float = 300.0
    simulated_nodes: int = 0
    simulated_placement: str = "rows"

    def __post_init__(self) -> None:
        config_integer("parallel.expert_parallel", self.expert_parallel, 0)
        config_integer("parallel.ranks_per_node", self.ranks_per_node, 0)
        if not isinstance(self.hierarchical, bool):
            invalid("parallel.hierarchical", self.hierarchical, "true or false")
        config_number("parallel.collective_timeout", self.collective_timeout, 0.0, 1e7, open_low=True)
        config_integer("parallel.simulated_nodes", self.simulated_nodes, 0)
        config_choice("parallel.simulated_placement", self.simulated_placement, SIMULATED_PLACEMENTS)
        if self.simulated_nodes and self.expert_parallel > 1:
            invalid(
                "parallel.simulated_nodes", self.simulated_nodes,
                f"0 when expert_parallel={self.expert_parallel} (nodes are simulated in one process; "
                "under torchrun set ranks_per_node)",
            )


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """One training run: where it writes (``out``) and its four sections.

    ``out`` may contain ``{field}`` placeholders of any section field, e.g. the default
    ``runs/{router}-seed{seed}``; :attr:`run_dir` fills them in.
    """

    out: str = "runs/{router}-seed{seed}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.out, str) or not self.out:
            invalid("out", self.out, "a directory path")
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                invalid(name, getattr(self, name), f"a {cls.__name__}")
        experts = self.model.num_experts
        if self.parallel.expert_parallel > 1 and experts % self.parallel.expert_parallel:
            invalid(
                "parallel.expert_parallel", self.parallel.expert_parallel,
                f"a divisor of num_experts={experts} (every rank holds the same number of experts)",
            )
        nodes = self.parallel.simulated_nodes
        if nodes and experts % nodes:
            invalid("parallel.simulated_nodes", nodes, f"a divisor of num_experts={experts}")
        if nodes and self.parallel.simulated_placement == "rows" and self.train.batch_size % nodes:
            invalid(
                "parallel.simulated_nodes", nodes,
                f"a divisor of batch_size={self.train.batch_size} (simulated_placement='rows' splits the rows)",
            )
        try:
            self.out.format(**self.flat())
        except (KeyError, IndexError, ValueError) as error:
            invalid("out", self.out, f"a path whose {{placeholders}} are config field names ({error})")

    @property
    def run_dir(self) -> Path:
        """``out`` with its ``{field}`` placeholders filled in."""
        return Path(self.out.format(**self.flat()))

    def flat(self) -> dict[str, Any]:
        """Every section field by its (unique) name."""
        values: dict[str, Any] = {}
        for name in SECTIONS:
            values.update(dataclasses.asdict(getattr(self, name)))
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Build a config from nested values (``{"out": ..., "model": {...}, ...}``) laid over ``base``
        (default: the defaults). Unknown keys are errors naming the key and the allowed ones."""
        base = base or cls()
        if not isinstance(values, dict):
            invalid("config", values, "a table with out, [model], [data], [train] and [parallel]")
        unknown = sorted(set(values) - {"out", *SECTIONS})
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)}; allowed: out, {', '.join(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            given = values.get(name, {})
            if not isinstance(given, dict):
                invalid(name, given, f"a table of {name} fields")
            allowed = [f.name for f in dataclasses.fields(section_cls)]
            unknown = sorted(set(given) - set(allowed))
            if unknown:
                raise ValueError(f"unknown [{name}] key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
            sections[name] = dataclasses.replace(getattr(base, name), **given)
        return cls(out=values.get("out", base.out), **sections)

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """Set fields by their flat name (``{"d_model": 128, "out": "runs/x"}``), already typed."""
        return RunConfig.from_dict(nest_fields(overrides), base=self)


def nest_fields(overrides: dict[str, Any], into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flat field values (``{"d_model": 128}``) as nested config values (``{"model": {"d_model": 128}}``),
    laid over ``into`` (a copy; the flat values win)."""
    nested: dict[str, Any] = {key: dict(value) if isinstance(value, dict) else value
                              for key, value in (into or {}).items()}
    owners = field_owners()
    for name, value in overrides.items():
        if name == "out":
            nested["out"] = value
        elif name in owners:
            section = nested.setdefault(owners[name], {})
            if not isinstance(section, dict):
                invalid(owners[name], section, f"a table of {owners[name]} fields")
            section[name] = value
        else:
            raise ValueError(f"unknown config field {name!r}")
    return nested


def field_owners() -> dict[str, str]:
    """Flat field name -> its section; asserts the names are unique (the CLI relies on it)."""
    owners: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in owners or f.name == "out":
                raise AssertionError(f"config field name {f.name!r} is not unique across sections")
            owners[f.name] = section
    return owners


def field_types() -> dict[str, str]:
    """Flat field name -> its annotation as written (``"int"``, ``"float | str"``, ...)."""
    types = {"out": "str"}
    for cls in SECTIONS.values():
        types.update({f.name: str(f.type) for f in dataclasses.fields(cls)})
    return types


def parse_scalar(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_field(name: str, text: str) -> Any:
    """Turn a command-line string into the typed value of field ``name``."""
    kind = field_types().get(name)
    if kind is None:
        raise ValueError(f"unknown config field {name!r}")
    try:
        if kind == "str":
            return text
        if kind == "bool":
            if text.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.strip().lower() in ("true", "1", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "int | None":
            return None if text.strip().lower() in ("none", "default") else int(text)
        if kind == "float | str":
            value = parse_scalar(text)
            return value if isinstance(value, str) else float(value)
        if kind.startswith("dict"):
            return _parse_options(text)
    except ValueError:
        pass
    section = field_owners().get(name)
    invalid(f"{section}.{name}" if section else name, text, f"a value of type {kind}")
    raise AssertionError("unreachable")


def _parse_options(text: str) -> dict[str, Any]:
    """``'{"tau": 0.8}'`` (JSON) or ``tau=0.8,margin=0.2``; ``""`` is no options."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError
        return value
    options = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError
        options[key.strip()] = parse_scalar(value.strip())
    return options


def load_config_file(
    path: str | Path, base: RunConfig | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Read a TOML (or JSON) config file laid over ``base``, with the flat-field ``overrides`` (the
    command line's flags) over the file; the merged config is validated once, so a file's value may
    rely on a flag (``d_model = 30`` with ``--n-heads 2``). A missing file is a ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text(encoding="utf-8"))
        else:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ValueError(f"config file {str(path)!r} is not valid {kind}: {error}") from None
    if not isinstance(values, dict):
        invalid("config", values, "a table with out, [model], [data], [train] and [parallel]")
    return RunConfig.from_dict(nest_fields(overrides or {}, into=values), base=base)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} to TOML")


def to_toml(config: RunConfig) -> str:
    """The config as TOML that :func:`load_config_file` reads back to an equal config. ``None``
    fields (TOML has no null) are left out, which restores their default, ``None``."""
    lines = [f"out = {_toml_value(config.out)}"]
    for name in SECTIONS:
        section = dataclasses.asdict(getattr(config, name))
        tables = {k: v for k, v in section.items() if isinstance(v, dict)}
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in section.items() if v is not None and k not in tables]
        for key, table in tables.items():
            lines += ["", f"[{name}.{key}]"]
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
