"""Typed router options: the base class of the one frozen dataclass per router (design §1–§4).

Each router's options class is defined beside the router, in the router's own module, and named by
its ``Options`` attribute (``SwitchOptions`` and ``TopKOptions`` in ``topk.py``, ``GrAPOptions`` in
``grap_router.py``, ``LocMoEPlusOptions`` in ``locmoe_plus.py``, ...), so a new router is its file plus
one line in the registry; :mod:`locmoe.routing` re-exports them all. These classes are the one
description of what a router can be told. The registry builds routers from them, the run
configuration (``[model.router_options]`` in TOML, ``--router-options`` on the command line) is checked
against them, and the comparison reports list them. A field's default *is* the router's default:
there is no separate "use the router's default" marker. ``capacity_factor=None`` means dropless and
only routers whose options set ``allows_dropless`` (``topk``, ``deepseek``) accept it.

Checks that need the layer's sizes (``top_k ≤ n``, ``top_l ≤ n``) and defaults that depend on them
(the GrAP gate temperature ``sqrt(n/d)``, the selection temperature ``3.2/√d``) are applied by
:meth:`RouterOptions.for_layer`, which returns the options a router of that size actually runs with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

Options = TypeVar("Options", bound="RouterOptions")


def check_capacity_factor(value: object, *, allow_dropless: bool) -> float | None:
    """A positive finite ``cf``, or ``None`` (dropless) where ``allow_dropless``."""
    if value is None:
        if allow_dropless:
            return None
        raise ValueError(
            "capacity_factor=None (dropless) is only allowed for the 'topk' router; pass a positive number"
        )
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"capacity_factor must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RouterOptions:
    """Base of every router's options. Subclasses add fields and extend :meth:`check`."""

    def __post_init__(self) -> None:
        self.check()

    allows_dropless: ClassVar[bool] = False
    """Whether ``capacity_factor=None`` (no capacity: every proposal kept) is allowed."""

    def check(self) -> None:
        """Validate the fields that do not depend on the layer's sizes (``ValueError`` naming the
        option, the value and what is allowed). Subclasses extend it, calling it first."""
        if "capacity_factor" in self.names():
            factor = check_capacity_factor(self.capacity_factor, allow_dropless=self.allows_dropless)
            object.__setattr__(self, "capacity_factor", factor)  # an int cf is stored as the float it means

    def for_layer(self: Options, d_model: int, num_experts: int) -> Options:
        """These options for a layer of ``d_model`` and ``num_experts``: size-dependent checks done,
        size-dependent defaults (``None``) filled in."""
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]
