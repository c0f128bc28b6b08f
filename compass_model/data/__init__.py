"""Data for training Compass: a generated SEA e-commerce corpus, checkable tasks, JSONL loaders,
tokenizers and sequence packing. Pure Python + torch; nothing is downloaded."""

from .corpus import (
                      CURRENCIES,
                      LANG_CURRENCY,
                      LANGS,
                      CorpusConfig,
                      format_amount,
                      generate_corpus,
)
from .loaders import (
                      DataError,
                      PreferenceRecord,
                      SFTRecord,
                      TextRecord,
                      load_preference_jsonl,
                      load_sft_jsonl,
                      load_text_jsonl,
                      write_jsonl,
)
from .packing import (
                      PackedBatch,
                      document_causal_mask,
                      pack_pretraining,
                      pack_sft,
                      prompt_weight_for,
)
from .tasks import FAMILIES, Task, check, make_tasks
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
                      "CURRENCIES",
                      "FAMILIES",
                      "LANGS",
                      "LANG_CURRENCY",
                      "ByteTokenizer",
                      "CorpusConfig",
                      "DataError",
                      "HFTokenizer",
                      "PackedBatch",
                      "PreferenceRecord",
                      "SFTRecord",
                      "Task",
                      "TextRecord",
                      "check",
                      "document_causal_mask",
                      "format_amount",
                      "generate_corpus",
                      "load_preference_jsonl",
                      "load_sft_jsonl",
                      "load_text_jsonl",
                      "load_tokenizer",
                      "make_tasks",
                      "pack_pretraining",
                      "pack_sft",
                      "prompt_weight_for",
                      "write_jsonl",
]
