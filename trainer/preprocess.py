"""Host-side preprocessing shared by training and the exported serving graphs.

`QueryTokenizer` turns raw query text into fixed-length token ids and
`decode_image` / `decode_images` turn encoded image bytes into float pixels.
Both use only TensorFlow and tensorflow-text ops, so the same code runs in the
tf.data input pipeline (on the host, never inside the model: TPUs have no
string ops) and inside an exported SavedModel that TF Serving can load.
"""

from __future__ import annotations

from typing import List

from trainer import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
import tensorflow_text as text

from trainer import features
from trainer.errors import ClicklensError

PAD_ID = features.RESERVED_TOKENS.index(features.PAD_TOKEN)
UNK_ID = features.RESERVED_TOKENS.index(features.UNK_TOKEN)


def load_vocab(vocab_path: str) -> List[str]:
    """Reads `vocab.txt` (one token per line, RESERVED_TOKENS first)."""
    if not tf.io.gfile.exists(vocab_path):
        raise ClicklensError(f"{vocab_path}: query vocabulary not found (run `clicklens pipeline` first)")
    with tf.io.gfile.GFile(vocab_path, "r") as f:
        tokens = [line.rstrip("\r\n") for line in f]
    while tokens and not tokens[-1]:
        tokens.pop()
    head = tokens[:len(features.RESERVED_TOKENS)]
    if head != features.RESERVED_TOKENS:
        raise ClicklensError(f"{vocab_path}: must start with {features.RESERVED_TOKENS}, starts with {head}")
    if len(set(tokens)) != len(tokens):
        raise ClicklensError(f"{vocab_path}: has duplicate tokens")
    return tokens


class QueryTokenizer(tf.Module):
    """Raw query strings -> int32 [batch, max_tokens] WordPiece ids, 0-padded.

    Mirrors `beam_pipelines.log_schema.normalize_query` in-graph (NFKC, then
    case folding; whitespace runs are split by the tokenizer anyway), then
    applies tensorflow_text.BertTokenizer with the pipeline's parameters, so
    CJK ideographs become one token each.  Word pieces of all words are
    concatenated, then truncated / padded to `max_tokens`.  The vocabulary is
    held as graph constants, so a SavedModel carrying this module needs no
    asset files.
    """

    def __init__(self, vocab_path: str, max_tokens: int, name: str = "query_tokenizer"):
        super().__init__(name=name)
        tokens = load_vocab(vocab_path)
        self.vocab_size = len(tokens)
        self.max_tokens = int(max_tokens)
        # The wordpiece kernel asks the table for -1 to learn that a piece is
        # out of vocabulary, so the table's default must be -1, not [UNK].
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(tokens, dtype=tf.string), tf.range(len(tokens), dtype=tf.int64)),
            default_value=-1)
        self._tokenizer = text.BertTokenizer(
            self._table, token_out_type=tf.int64, unknown_token=features.UNK_TOKEN,
            **features.BERT_TOKENIZER_PARAMS)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, queries):
        """tf.string [B] -> tf.int32 [B, max_tokens]."""
        normalized = text.case_fold_utf8(text.normalize_utf8(queries, "NFKC"))
        pieces = self._tokenizer.tokenize(normalized).merge_dims(-2, -1)
        pieces = tf.ragged.map_flat_values(lambda ids: tf.where(ids < 0, tf.constant(UNK_ID, tf.int64), ids), pieces)
        ids = pieces[:, :self.max_tokens].to_tensor(default_value=PAD_ID, shape=[None, self.max_tokens])
        return tf.cast(ids, tf.int32)


def decode_image(image_bytes, image_size: int, allow_empty: bool = False):
    """Encoded PNG/JPEG/GIF/BMP (tf.string scalar) -> float32 [S, S, 3] in [0, 1].

    Grayscale and RGBA images become RGB; animated GIFs use their first frame.
    With `allow_empty`, b"" (a padded neighbour or negative slot) decodes to
    zeros; otherwise empty bytes fail like any undecodable image.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)

    def decode():
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.float32)
        image = tf.image.resize(image, [image_size, image_size], antialias=True)
        return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), [image_size, image_size, 3])

    if not allow_empty:
        return decode()
    return tf.cond(tf.strings.length(image_bytes) > 0, decode,
                   lambda: tf.zeros([image_size, image_size, 3], tf.float32))


def decode_images(image_bytes, image_size: int, allow_empty: bool = False):
    """tf.string [B] -> float32 [B, S, S, 3] (see decode_image)."""
    return tf.map_fn(lambda b: decode_image(b, image_size, allow_empty), image_bytes,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
