"""Per-example gradients: exact (layer factors, vmap fallback), exact Gram over linear layers, random-projection
sketches, and group discovery from their Gram (discovery.py)."""
from capshape.grads.capture import capture_linear_io, linear_layer_names
from capshape.grads.exact import per_example_gradients
from capshape.grads.gram import gradient_gram, sketch_gram
from capshape.grads.sketch import GradientSketcher

__all__ = ["per_example_gradients", "GradientSketcher", "gradient_gram", "sketch_gram", "capture_linear_io",
           "linear_layer_names"]
