"""Export a run's model to a safetensors file that loads back without pickle.

A checkpoint (:mod:`locmoe.checkpoint`) is a ``torch.save`` file: it holds the optimiser, RNG states
and the rest of what an exact resume needs, and reading it means unpickling (restricted, but still
pickle). An export keeps only what inference needs, in a format with no code in it at all:

* the tensors: ``GPT.state_dict()`` of the one-process model, i.e. the consolidated,
  rank-count-independent weights (every MoE layer's experts as full ``(n, ...)`` tensors in global
  expert order) plus the persistent buffers (router state such as the LocMoE+ capacity). Non-persistent
  buffers (rotary tables, the GrAP gate weights, the expert ids) are not stored: building the model
  from its config recreates them, exactly as a checkpoint load does;
* the safetensors string metadata (:func:`read_metadata` decodes it): ``model_config`` (JSON of
  :class:`~locmoe.config.ModelConfig`), ``vocab_size``, ``locmoe_version``, ``step``,
  ``source_checkpoint``, ``run_config`` (the run's whole resolved config, JSON, for provenance),
  ``tied_weights`` (JSON, below) and ``tokenizer`` (the tokenizer's JSON). A tokenizer larger than
  :data:`TOKENIZER_INLINE_LIMIT` characters would crowd the safetensors header (its readers refuse
  headers over 100 MB), so it goes to ``<name>.tokenizer.json`` next to the file instead and the
  metadata names that file in ``tokenizer_file``.

Tied weights: the LM head shares the token embedding's tensor, and safetensors refuses to store two
names for one memory. Every group of state-dict entries that are the same tensor view is stored once,
under its first name (``token_embedding.weight``); ``tied_weights`` maps each dropped name to the
stored one (``{"lm_head.weight": "token_embedding.weight"}``). :func:`load_safetensors_model` puts
the dropped names back, pointing at the stored tensor, and loads strictly; the model built from the
config ties the head to the embedding itself, so the tie survives the round trip.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from locmoe.atomic_file import atomic_path, write_atomic
from locmoe.checkpoint import resolve_checkpoint
from locmoe.config import ModelConfig, RunConfig
from locmoe.model import GPT, build_model
from locmoe.parallel.checkpoint import load_consolidated_state_dict
from locmoe.provenance import package_versions

EXPORT_FORMATS = ("safetensors",)
EXPORT_VERSION = 1
# Tokenizer JSON longer than this (characters) goes to a sidecar file rather than into the header.
TOKENIZER_INLINE_LIMIT = 32 * 2**20
TOKENIZER_SUFFIX = ".tokenizer.json"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote: the file, its sidecar tokenizer (if any), the checkpoint
    it came from, the step, the number of stored tensors and the file's size in bytes."""

    path: Path
    tokenizer_path: Path | None
    checkpoint: Path
    step: int
    tensors: int
    bytes: int


def check_format(name: str) -> str:
    """``name`` if it is an export format, else ``ValueError`` (the CLI turns it into exit code 2)."""
    if name not in EXPORT_FORMATS:
        raise ValueError(f"--format={name!r} is invalid; allowed: {', '.join(EXPORT_FORMATS)}")
    return name


def tokenizer_sidecar(path: str | Path) -> Path:
    """Where the tokenizer of the export ``path`` goes when it is too large for the header:
    ``model.safetensors`` -> ``model.tokenizer.json``."""
    path = Path(path)
    return path.with_name(path.stem + TOKENIZER_SUFFIX)


def checkpoint_model(checkpoint: str | Path) -> tuple[Path, dict[str, Any], RunConfig, GPT]:
    """The checkpoint file (or run directory, its newest valid checkpoint), its state, its config and
    its model in one process, weights loaded and in eval mode. ``ValueError`` for anything unusable."""
    path, state = resolve_checkpoint(checkpoint)
    try:
        config = RunConfig.from_dict(state["config"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"checkpoint {path} has a config this locmoe cannot use: {error}") from None
    model = build_model(config.model, config.data.vocab_size)
    try:
        # Checks every MoE layer's experts (count, ids, shapes) against the model, then loads strictly.
        load_consolidated_state_dict(model, state["model"])
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"cannot load {path}: {error}") from None
    model.eval()
    return path, state, config, model


def _alias_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Two state-dict entries with this same key are one tensor under two names (a tie)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor.dtype, tensor.device)


def untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split ``state`` into the tensors to store (each shared tensor once, under its first name,
    made contiguous on the CPU) and ``{dropped name: stored name}`` for the others."""
    stored: dict[str, torch.Tensor] = {}
    first_name: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        key = _alias_key(tensor)
        if key in first_name:
            tied[name] = first_name[key]
            continue
        first_name[key] = name
        stored[name] = tensor.detach().cpu().contiguous()
    return stored, tied


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise ValueError(f"{' and '.join(existing)} already {verb}; pass --force to overwrite")
    for path in paths:
        if path.exists() and not path.is_file():
            raise ValueError(f"{str(path)!r} exists and is not a file; refusing to overwrite it")


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, *, format: str = "safetensors", force: bool = False
) -> ExportResult:
    """Write the model of ``checkpoint`` (a file, or a run directory: its newest valid checkpoint) to
    ``out`` in ``format`` (only ``"safetensors"``), with the metadata described in the module
    docstring. ``ValueError`` for an unknown format, an unusable checkpoint, or an existing ``out``
    (or tokenizer sidecar) without ``force``; nothing is written then."""
    check_format(format)
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file name such as model.safetensors")
    path, state, config, model = checkpoint_model(checkpoint)
    tokenizer = state.get("tokenizer")
    if not isinstance(tokenizer, str):
        raise ValueError(f"checkpoint {path} holds no tokenizer; this locmoe cannot export it")
    sidecar = tokenizer_sidecar(out) if len(tokenizer) > TOKENIZER_INLINE_LIMIT else None
    _refuse_existing([out] + ([sidecar] if sidecar else []), force)
    tensors, tied = untie(model.state_dict())
    meta = {
        "format": "pt",  # the safetensors convention for a PyTorch state dict
        "locmoe_export": str(EXPORT_VERSION),
        "locmoe_version": package_versions()["locmoe"] or "unknown",
        "model_config": json.dumps(dataclasses.asdict(config.model), sort_keys=True),
        "vocab_size": str(config.data.vocab_size),
        "step": str(int(state["step"])),
        "source_checkpoint": str(path.resolve()),
        "run_config": json.dumps(config.to_dict(), sort_keys=True),
        "tied_weights": json.dumps(tied, sort_keys=True),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if sidecar is None:
        meta["tokenizer"] = tokenizer
    else:
        meta["tokenizer_file"] = sidecar.name
        write_atomic(sidecar, tokenizer.encode("utf-8"))
    with atomic_path(out) as temp:
        save_file(tensors, str(temp), metadata=meta)
    return ExportResult(out, sidecar, path, int(state["step"]), len(tensors), out.stat().st_size)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The export's metadata, decoded: ``model_config``, ``run_config`` and ``tied_weights`` as dicts,
    ``vocab_size``, ``step`` and ``locmoe_export`` as ints, ``tokenizer`` as the tokenizer's JSON text
    (read from the sidecar when the header names one), the rest as strings. Reads the header only.
    ``ValueError`` if the file is not a locmoe export."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise ValueError(f"{str(path)!r} is not a safetensors file ({type(error).__name__}: {error})") from None
    missing = [key for key in ("locmoe_export", "model_config", "vocab_size", "tied_weights") if key not in raw]
    if missing:
        raise ValueError(f"{str(path)!r} is not a locmoe export (its metadata lacks {', '.join(missing)})")
    decoded: dict[str, Any] = dict(raw)
    try:
        for key in ("model_config", "run_config", "tied_weights"):
            if key in raw:
                decoded[key] = json.loads(raw[key])
        for key in ("vocab_size", "step", "locmoe_export"):
            if key in raw:
                decoded[key] = int(raw[key])
    except ValueError as error:
        raise ValueError(f"{str(path)!r} has malformed locmoe metadata: {error}") from None
    if decoded["locmoe_export"] != EXPORT_VERSION:
        raise ValueError(
            f"{str(path)!r} is locmoe export version {decoded['locmoe_export']}; this locmoe reads {EXPORT_VERSION}"
        )
    if "tokenizer" not in decoded and "tokenizer_file" in raw:
        sidecar = path.with_name(Path(raw["tokenizer_file"]).name)
        if not sidecar.is_file():
            raise ValueError(f"{str(path)!r} keeps its tokenizer in {str(sidecar)!r}, which does not exist")
        decoded["tokenizer"] = sidecar.read_text(encoding="utf-8")
    return decoded


def load_safetensors_model(path: str | Path) -> tuple[GPT, dict[str, Any]]:
    """Rebuild the exported model: ``build_model(ModelConfig(**model_config), vocab_size)``, its
    weights from ``safetensors.torch.load_file`` (no pickle anywhere), tied names re-pointed at their
    stored tensor, loaded strictly, in eval mode on the CPU. Returns the model and
    :func:`read_metadata`'s dict. Its logits equal those of the checkpoint's model exactly."""
    meta = read_metadata(path)
    try:
        config = ModelConfig(**meta["model_config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(path)!r} has a model config this locmoe cannot use: {error}") from None
    model = build_model(config, meta["vocab_size"])
    tensors = load_file(str(path), device="cpu")
    for alias, source in meta["tied_weights"].items():
        if source not in tensors:
            raise ValueError(f"{str(path)!r}: tied weight {alias!r} points at {source!r}, which is not stored")
        tensors[alias] = tensors[source]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{str(path)!r} does not fit the model its metadata describes: {error}") from None
    model.eval()
    return model, meta
