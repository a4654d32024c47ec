"""Corpus loading (PTB resolution, checksums, tokenization, caching) and batching.

May import only ``lm.config``, ``lm.errors`` and ``lm.files``.
"""

from lm.data.batching import batchify, bptt_windows
from lm.data.corpus import Corpus, load_corpus

__all__ = ["Corpus", "load_corpus", "batchify", "bptt_windows"]
