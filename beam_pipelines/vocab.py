"""Stage 8: the WordPiece query vocabulary, learned from the training queries.

Words are counted in Beam with tensorflow-text's BasicTokenizer using the
parameters the trainer's BertTokenizer uses (clicklens.vocabulary.BERT_TOKENIZER_PARAMS),
so CJK ideographs are single words and Latin text is case-folded exactly as at
training and serving time.  The word counts (one row per distinct word: a
vocabulary-sized collection, not a log-sized one) are then handed to
tensorflow-text's WordPiece learner, with clicklens.vocabulary.RESERVED_TOKENS first.

With pipeline.base_vocab (an earlier run's vocab.txt) the ids stay stable
across runs, so a warm-started model keeps its trained token rows: the
written vocabulary is the base's tokens in their order, then the newly
learned tokens the base lacks, in the learner's order, up to
pipeline.vocab_capacity tokens in all (0: 2 x vocab_size); the new tokens past
it are left out (`merge_vocabulary`).  A base already at or over the capacity
is kept whole, with nothing added.  Without a base the learned vocabulary is
written as it is.
"""


from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam

from beam_pipelines.outputs import WriteSingleFile
from beam_pipelines.split import TRAIN, query_split
from clicklens.vocabulary import BERT_TOKENIZER_PARAMS, RESERVED_TOKENS

# Queries tokenized per TensorFlow call.
TOKENIZE_BATCH = 512
# Outputs of LearnAndWriteVocabulary: the tokens written, and with a base vocabulary the merge's figures.
TOKENS = "tokens"
MERGE = "merge"


def basic_tokenizer():
    """tensorflow-text's BasicTokenizer(**BERT_TOKENIZER_PARAMS): how every clicklens stage splits text into words."""
    from tensorflow_text.python.ops import bert_tokenizer  # imports TensorFlow: only where words are counted

    return bert_tokenizer.BasicTokenizer(**BERT_TOKENIZER_PARAMS)


def basic_tokenize(queries: List[str]) -> List[List[str]]:
    """The words basic_tokenizer() splits each query into (for tests and checks)."""
    return [[w.decode("utf-8") for w in ws] for ws in basic_tokenizer().tokenize(queries).to_list()]


class CountWordsFn(beam.DoFn):
    """Batches of (query, count) -> (word, count) per word of each query, BasicTokenizer-split."""

    def __init__(self):
        self._tokenizer = None

    def setup(self):
        self._tokenizer = basic_tokenizer()

    def process(self, batch: List[Tuple[str, int]]):
        queries = [q for q, _ in batch]
        words = self._tokenizer.tokenize(queries).to_list()
        for (_, count), query_words in zip(batch, words):
            for word in query_words:
                yield word.decode("utf-8"), count


def learn_vocabulary(word_counts: Iterable[Tuple[str, int]], vocab_size: int) -> List[str]:
    """tensorflow-text's WordPiece learner over word counts; reserved tokens first.

    Every character of the counted words is allowed into the alphabet (up to
    max(vocab_size, 1000) distinct characters), so each CJK character seen in
    training is its own token.
    """
    from tensorflow_text.tools.wordpiece_vocab import wordpiece_tokenizer_learner_lib as learner

    counts = sorted(word_counts, key=lambda wc: (-wc[1], wc[0]))
    if not counts:
        return list(RESERVED_TOKENS)
    vocab = learner.learn(counts, vocab_size, list(RESERVED_TOKENS), max_unique_chars=max(vocab_size, 1000))
    return list(RESERVED_TOKENS) + [t for t in vocab if t not in RESERVED_TOKENS]


class LearnVocabulary(beam.PTransform):
    """(query, events) per distinct training query -> a single list of vocabulary tokens."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self._vocab_size = vocab_size

    def expand(self, query_counts):
        vocab_size = self._vocab_size
        return (
            query_counts
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=TOKENIZE_BATCH)
            | "Tokenize" >> beam.ParDo(CountWordsFn())
            | "CountWords" >> beam.CombinePerKey(sum)
            | "AllWordCounts" >> beam.combiners.ToList()
            | "Learn" >> beam.Map(learn_vocabulary, vocab_size)
        )


def is_train_query(query: str, eval_fraction: float) -> bool:
    """Whether a normalised query's examples go to the train split (the vocabulary sees only those)."""
    return query_split(query, eval_fraction) == TRAIN


class BaseVocabulary(NamedTuple):
    """pipeline.base_vocab, read (clicklens.vocabulary.load_vocab): its path and tokens, and the capacity."""

    path: str
    tokens: Tuple[str, ...]
    capacity: int  # tokens in all at most (pipeline.vocab_capacity, or 2 x vocab_size)


class VocabMerge(NamedTuple):
    """The vocabulary written with a base, and how it was made."""

    tokens: List[str]
    base_tokens: int
    new_tokens_added: int
    new_tokens_left_out: int


def merge_vocabulary(learned: Sequence[str], base: Sequence[str], capacity: int) -> VocabMerge:
    """The base's tokens in their order, then the learned tokens not in it (learner's order), up to `capacity`
    tokens in all; the base is kept whole even when it alone is over the capacity."""
    known = set(base)
    new = [t for t in learned if t not in known]
    room = max(capacity - len(base), 0)
    return VocabMerge(list(base) + new[:room], len(base), min(room, len(new)), max(len(new) - room, 0))


def merge_figures(merge: VocabMerge, base: BaseVocabulary) -> dict:
    """The report's `base_vocab` object."""
    return {"path": base.path, "capacity": base.capacity, "base_tokens": merge.base_tokens,
            "new_tokens_added": merge.new_tokens_added, "new_tokens_left_out": merge.new_tokens_left_out}


class LearnAndWriteVocabulary(beam.PTransform):
    """(query, QueryStats) -> the vocabulary learned from the train-split text queries (each counted once per
    search event), written one token per line to `path`.

    Returns {TOKENS: the single list of tokens written}; with a `base` (BaseVocabulary) the learned tokens
    are appended to it (merge_vocabulary) and there is also {MERGE: the report's base_vocab object}.
    """

    def __init__(self, vocab_size: int, eval_fraction: float, path: str, base: Optional[BaseVocabulary] = None):
        super().__init__()
        self._vocab_size = vocab_size
        self._eval_fraction = eval_fraction
        self._path = path
        self._base = base

    def expand(self, query_stats):
        eval_fraction = self._eval_fraction
        vocabulary = (
            query_stats
            | "TrainQueryEvents" >> beam.FlatMapTuple(
                lambda query, stats: [(query, stats.events)] if is_train_query(query, eval_fraction) else [])
            | "LearnVocabulary" >> LearnVocabulary(self._vocab_size)
        )
        out = {}
        base = self._base
        if base is not None:
            merged = vocabulary | "MergeWithBase" >> beam.Map(merge_vocabulary, base.tokens, base.capacity)
            vocabulary = merged | "MergedTokens" >> beam.Map(lambda merge: merge.tokens)
            out[MERGE] = merged | "MergeFigures" >> beam.Map(merge_figures, base)
        vocabulary | "VocabText" >> beam.Map("\n".join) | "WriteVocab" >> WriteSingleFile(self._path)
        out[TOKENS] = vocabulary
        return out
