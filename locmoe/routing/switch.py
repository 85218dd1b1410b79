"""Switch routing (Fedus et al. 2022): top-1 of a learned softmax gate, first-come capacity."""

from __future__ import annotations

from locmoe.routing.topk import SwitchOptions, TopKRouter


class SwitchRouter(TopKRouter):
    """``switch``: learned linear gate, top-1 of softmax, capacity ``ceil(cf · S / n)`` served by
    position, gate value = the chosen expert's softmax probability (LocMoE eqs. 2–3).

    Options: :class:`locmoe.routing.topk.SwitchOptions` (``capacity_factor`` 1.1, the papers'
    baseline; ``aux_coef`` 0.01; ``z_loss_coef`` 0).
    """

    name = "switch"
    Options = SwitchOptions
    options: SwitchOptions  # type: ignore[assignment]
    top_k = 1  # type: ignore[assignment]
    renormalize = False  # type: ignore[assignment]
