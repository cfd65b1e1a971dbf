"""Small models with named activation sites: a decoder-only transformer and an MLP."""
from capshape.models.hooks import Site, SiteModel
from capshape.models.losses import per_example_losses
from capshape.models.mlp import MLPClassifier
from capshape.models.transformer import Transformer

__all__ = ["Site", "SiteModel", "per_example_losses", "Transformer", "MLPClassifier"]
