"""Character-level tokenizer shared by every synthetic sequence task.

A sequence is `<bos> prompt <sep> target <eos>`, right-padded with `<pad>`; the model is trained to
predict only the target characters and the closing `<eos>`.
"""
from __future__ import annotations

import string

from capshape.errors import CapshapeError

SPECIALS = ("<pad>", "<bos>", "<sep>", "<eos>")
CHARACTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-*/%&=,;:|<>()[]_.!?#@^~"
PAD, BOS, SEP, EOS = range(4)
IGNORE = -100


class CharTokenizer:
    def __init__(self) -> None:
        self.vocab = list(SPECIALS) + list(CHARACTERS)
        self.index = {ch: i for i, ch in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[ch] for ch in text]
        except KeyError as missing:
            raise CapshapeError(
                f"Character {missing.args[0]!r} in {text!r} is not in the tokenizer's alphabet "
                f"({CHARACTERS!r}): remove it from the task data."
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i >= len(SPECIALS))

    def encode_pair(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """Model inputs and labels for one example; labels are IGNORE except on target + <eos>.

        inputs = <bos> prompt <sep> target,  labels = (ignored...) target <eos>  (next-token shift).
        """
        sequence = [BOS, *self.encode(prompt), SEP, *self.encode(target), EOS]
        labels = [IGNORE] * (len(prompt) + 1) + sequence[len(prompt) + 2 :]
        return sequence[:-1], labels


TOKENIZER = CharTokenizer()
