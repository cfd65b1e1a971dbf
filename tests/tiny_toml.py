"""TOML tables shared by the end-to-end tests: the smallest transformer they train."""

TINY_MODEL = """
[model]
n_layer = 1
n_head = 2
d_model = 16
d_mlp = 32
max_len = 24
"""
