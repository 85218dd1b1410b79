"""Experts: stacked FFN weights (:class:`GroupedExperts`) and the backends that compute them.

``backend`` defines the interface, ``fused`` the CPU default (hand-written backward), ``reference``
plain autograd; ``module`` holds the weights and picks the backend by name.
"""

from locmoe.experts.backend import ACTIVATIONS, ExpertsBackend, ExpertWeights
from locmoe.experts.module import BACKENDS, GroupedExperts, available_backends

__all__ = ["ACTIVATIONS", "BACKENDS", "ExpertWeights", "ExpertsBackend", "GroupedExperts", "available_backends"]
