"""Tokenizers: a byte-level UTF-8 tokenizer by default (no downloads), or a ``tokenizers`` JSON file.

``ByteTokenizer``: ids 0-255 are the UTF-8 bytes, then PAD = 256, BOS = 257, EOS = 258, so
``vocab_size = 259`` (a model's ``vocab_size`` must be at least this; round up to 264 or 320 if a
multiple of 8 / 64 is wanted for the embedding matmul). Thai and Vietnamese characters take 3 and
2-3 bytes, emoji 4, so sequences are ~2-3x longer than for English at the same character count.

Both tokenizers have ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``encode(text, bos, eos)``
and ``decode(ids)``; ``load_tokenizer(None)`` gives the byte tokenizer, ``load_tokenizer(path)`` the
JSON one (raises ImportError with an install hint if ``tokenizers`` is missing: it was asked for).
"""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) plus PAD, BOS and EOS: no file, no training."""
    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        """``text`` -> its UTF-8 bytes, with BOS / EOS when asked."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids) -> str:
        """Special ids are dropped; a truncated multi-byte character (e.g. a generation cut mid-emoji)
        decodes to U+FFFD instead of raising."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


_SPECIAL_NAMES = {"pad": ("<pad>", "[PAD]", "<|pad|>"), "bos": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>"),
                  "eos": ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>")}


class HFTokenizer:
    """A ``tokenizers`` JSON file. Special tokens are looked up by name (``<pad>``/``[PAD]``, ``<s>``/
    ``<bos>``/``[BOS]``/``<|begin_of_text|>``, ``</s>``/``<eos>``/``[EOS]``/``<|end_of_text|>``)."""

    def __init__(self, path):
        from compass_model._deps import require

        Tokenizer = require("tokenizers", "model", f"loading tokenizer file {path} (without a file the byte "
                            "tokenizer is used)").Tokenizer
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        for kind, names in _SPECIAL_NAMES.items():
            ids = [self._tok.token_to_id(n) for n in names]
            setattr(self, f"{kind}_id", next((i for i in ids if i is not None), None))
        if self.eos_id is None:
            raise ValueError(f"tokenizer file {path} has no EOS token (looked for {_SPECIAL_NAMES['eos']})")
        if self.pad_id is None:
            self.pad_id = self.eos_id   # padding is masked out of every loss, so EOS can stand in

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        """``text`` -> token ids (no special tokens of the file), with BOS / EOS when asked."""
        if bos and self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Token ids -> text, special tokens dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path=None):
    """``None`` -> ``ByteTokenizer()``; a path -> ``HFTokenizer(path)``."""
    return ByteTokenizer() if path is None else HFTokenizer(path)
