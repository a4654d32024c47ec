"""flipout-lm: LSTM language models on Penn Treebank with pluggable recurrent regularizers.

Flipout: Wen, Vicol, Ba, Tran, Grosse, ICLR 2018 (arXiv 1803.04386).
"""

__version__ = "0.1.0"
