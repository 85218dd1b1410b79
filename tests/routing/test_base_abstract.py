"""The Router base class is abstract: a router must define ``route``."""

import pytest

from locmoe.routing.base import Router


def test_a_router_without_route_cannot_be_built():
    class Incomplete(Router):
        name = "incomplete"

    with pytest.raises(TypeError, match="route"):
        Incomplete(8, 2)
