"""Experts: stacked FFN weights (:class:`GroupedExperts`) and the backends that compute them.

``backend`` defines the interface, ``fused`` the CPU default (hand-written backward), ``reference``
plain autograd, ``grouped`` one grouped matrix multiply per projection (the GPU path); ``module``
holds the weights and picks the backend by name (``"auto"``: grouped on CUDA where it runs, else fused).
"""

from locmoe.experts.backend import ACTIVATIONS, ExpertsBackend, ExpertWeights
from locmoe.experts.module import BACKENDS, GroupedExperts, available_backends, resolve_backend

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "ExpertWeights",
    "ExpertsBackend",
    "GroupedExperts",
    "available_backends",
    "resolve_backend",
]
