"""Gradient routing (Cloud et al. 2024): masks on gradients, chosen by data labels, that localise what
each kind of data teaches. Activation-level masks at named sites, parameter-level routing, and the
expand / contract of transformer MLPs used by Expand-Route-Ablate. See README.md."""
from capshape.routing.expand import Expansion, contract_mlp, expand_mlp, expand_units
from capshape.routing.masks import ActivationRouter, ForwardMasks, RoutedLosses, Routes, example_hash, route
from capshape.routing.parameters import ParameterRouter, check_spec

__all__ = ["route", "Routes", "example_hash", "ActivationRouter", "ForwardMasks", "RoutedLosses", "ParameterRouter", "check_spec",
           "Expansion", "expand_mlp", "expand_units", "contract_mlp"]
