"""Query text -> token ids, in the TensorFlow graph (training input and every exported query signature).

Uses only TensorFlow and tensorflow-text ops, so the same code runs in the
tf.data input pipeline (on the host, never inside the model: TPUs have no
string ops) and inside an exported SavedModel that stock TF Serving can load.
"""

from __future__ import annotations

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
import tensorflow_text as text

from clicklens import vocabulary
from clicklens.queries import MAX_QUERY_INPUT_BYTES, normalize_queries


class QueryTokenizer(tf.Module):
    """Raw query strings -> int32 [batch, max_tokens] WordPiece ids, 0-padded.

    Normalises with `clicklens.queries.normalize_queries` (the graph twin of
    the pipeline's `normalize_query`), then applies tensorflow_text.BertTokenizer
    with the vocabulary contract's parameters, so CJK ideographs become one
    token each.  Word pieces of all words are concatenated, then truncated /
    padded to `max_tokens`.  The vocabulary is held as graph constants, so a
    SavedModel carrying this module needs no asset files.
    """

    def __init__(self, vocab_path: str, max_tokens: int, name: str = "query_tokenizer"):
        super().__init__(name=name)
        tokens = vocabulary.load_vocab(vocab_path)
        self.vocab_size = len(tokens)
        self.max_tokens = int(max_tokens)
        # The wordpiece kernel asks the table for -1 to learn that a piece is
        # out of vocabulary, so the table's default must be -1, not [UNK].
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(tokens, dtype=tf.string), tf.range(len(tokens), dtype=tf.int64)),
            default_value=-1)
        self._tokenizer = text.BertTokenizer(
            self._table, token_out_type=tf.int64, unknown_token=vocabulary.UNK_TOKEN,
            **vocabulary.BERT_TOKENIZER_PARAMS)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, queries):
        """tf.string [B] -> tf.int32 [B, max_tokens]."""
        queries = tf.strings.substr(queries, 0, MAX_QUERY_INPUT_BYTES)  # bounds the normaliser's time
        pieces = self._tokenizer.tokenize(normalize_queries(queries)).merge_dims(-2, -1)
        unknown = tf.constant(vocabulary.UNK_ID, tf.int64)
        pieces = tf.ragged.map_flat_values(lambda ids: tf.where(ids < 0, unknown, ids), pieces)
        ids = pieces[:, :self.max_tokens].to_tensor(default_value=vocabulary.PAD_ID, shape=[None, self.max_tokens])
        return tf.cast(ids, tf.int32)
