"""Adapters that bring capshape's objectives into other training stacks (hf.py: Hugging Face Trainer).
Top layer, beside the CLI: nothing in capshape imports it."""
