"""The query vocabulary (`W/examples/vocab.txt`): one WordPiece token per line.

The pipeline learns it with tensorflow-text's WordPiece learner from words
split by tensorflow-text's BasicTokenizer; the trainer and every exported
query signature tokenize with tensorflow_text.BertTokenizer.  Both use
BERT_TOKENIZER_PARAMS, so text splits identically everywhere: CJK ideographs
become one token each and Latin text is case-folded.  The reserved tokens
come first, so their ids are fixed.
"""

from __future__ import annotations

from typing import List

from clicklens.errors import ClicklensError

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
RESERVED_TOKENS = [PAD_TOKEN, UNK_TOKEN]  # token ids 0 and 1, in this order
PAD_ID = RESERVED_TOKENS.index(PAD_TOKEN)
UNK_ID = RESERVED_TOKENS.index(UNK_TOKEN)
BERT_TOKENIZER_PARAMS = {"lower_case": True}


def load_vocab(vocab_path: str) -> List[str]:
    """Reads `vocab.txt` (local or any TF filesystem); checks the reserved tokens and duplicates."""
    import tensorflow as tf

    if not tf.io.gfile.exists(vocab_path):
        raise ClicklensError(f"{vocab_path}: query vocabulary not found (run `clicklens pipeline` first)")
    with tf.io.gfile.GFile(vocab_path, "r") as f:
        tokens = [line.rstrip("\r\n") for line in f]
    while tokens and not tokens[-1]:
        tokens.pop()
    head = tokens[:len(RESERVED_TOKENS)]
    if head != RESERVED_TOKENS:
        raise ClicklensError(f"{vocab_path}: must start with {RESERVED_TOKENS}, starts with {head}")
    if len(set(tokens)) != len(tokens):
        raise ClicklensError(f"{vocab_path}: has duplicate tokens")
    return tokens
