"""Augmentation rules on fixed seeds: each probability shows up at its rate, POS replacement keeps
the tag and follows the unigram distribution, n-grams are contiguous with n in 1..5, duplicates
are dropped, n_iter copies per example, the cap, pair sides; TinyBERT's neighbours against a
numpy cosine top-K; the real spaCy tagger loads offline."""

import collections

import numpy as np
import pytest

from kdjax import augment, data

WORDS_BY_TAG = {"NN": ["film", "movie", "plot", "actor", "story", "scene"],
                "JJ": ["good", "bad", "dull", "great", "fine"],
                "DT": ["the", "a"], "VBD": ["was", "seemed"]}
TAG_OF = {w: t for t, words in WORDS_BY_TAG.items() for w in words}


def _tagged_corpus(n=400, length=12, seed=0):
    """Random sentences with a known tag per word (each word has exactly one tag)."""
    rng = np.random.default_rng(seed)
    vocab = sorted(TAG_OF)
    texts = [" ".join(rng.choice(vocab, size=length)) for _ in range(n)]
    tags = [[TAG_OF[w] for w in t.split()] for t in texts]
    return texts, tags


def _copies(generator, rounds, seed=0):
    rng = np.random.default_rng(seed)
    return [generator.corpus.texts(*generator.round(rng)) for _ in range(rounds)]


def test_masking_rate_matches_p_mask():
    texts, tags = _tagged_corpus()
    gen = augment.TangGenerator(texts, augment.TangRules(p_mask=0.15, p_pos=0, p_ng=0), tags=tags)
    masked = total = 0
    for copy in _copies(gen, 5):
        for original, new in zip(texts, copy):
            o, c = original.split(), new.split()
            assert len(o) == len(c)
            assert all(x == y or y == augment.MASK for x, y in zip(o, c))
            masked += sum(y == augment.MASK for y in c)
            total += len(c)
    assert masked / total == pytest.approx(0.15, abs=0.01)  # 24,000 words: sd 0.0023


def test_pos_replacement_keeps_the_tag_at_rate_p_pos_from_the_unigram_distribution():
    texts, tags = _tagged_corpus()
    p_pos = 0.3
    gen = augment.TangGenerator(texts, augment.TangRules(p_mask=0, p_pos=p_pos, p_ng=0),
                                tags=tags)
    counts = collections.Counter(w for t in texts for w in t.split())
    tag_totals = collections.Counter()
    for w, c in counts.items():
        tag_totals[TAG_OF[w]] += c
    changed = expected_changed = 0
    drawn_nouns = collections.Counter()
    for copy in _copies(gen, 5):
        for original, new in zip(texts, copy):
            for x, y in zip(original.split(), new.split()):
                assert TAG_OF[y] == TAG_OF[x]  # Same tag, never [MASK].
                changed += x != y
                # A replacement draw may give the word itself back.
                expected_changed += p_pos * (1 - counts[x] / tag_totals[TAG_OF[x]])
                if x != y and TAG_OF[x] == "NN":
                    drawn_nouns[y] += 1
    assert changed == pytest.approx(expected_changed, rel=0.05)
    # Drawn nouns follow the training unigram counts (conditioned on differing from the original
    # word, which with six near-equal nouns barely tilts the shares).
    total = sum(drawn_nouns.values())
    noun_total = sum(counts[w] for w in WORDS_BY_TAG["NN"])
    for w in WORDS_BY_TAG["NN"]:
        assert drawn_nouns[w] / total == pytest.approx(counts[w] / noun_total, abs=0.02)


def test_pos_table_samples_each_tags_unigram_distribution():
    word_ids = np.array([1, 1, 1, 2, 3, 3, 4])
    tag_ids = np.array([0, 0, 0, 0, 1, 1, 1])  # tag 0: word 1 x3, word 2 x1; tag 1: 3 x2, 4 x1
    table = augment.PosTable(word_ids, tag_ids, 2)
    rng = np.random.default_rng(0)
    draws0 = table.sample(np.zeros(40_000, np.int64), rng)
    draws1 = table.sample(np.ones(40_000, np.int64), rng)
    assert set(draws0) == {1, 2} and set(draws1) == {3, 4}
    assert np.mean(draws0 == 1) == pytest.approx(0.75, abs=0.01)
    assert np.mean(draws1 == 3) == pytest.approx(2 / 3, abs=0.01)


def test_ngram_sampling_keeps_a_contiguous_ngram_at_rate_p_ng():
    texts, tags = _tagged_corpus(length=12)
    gen = augment.TangGenerator(texts, augment.TangRules(p_mask=0, p_pos=0, p_ng=0.25),
                                tags=tags)
    lengths = []
    cut = total = 0
    for copy in _copies(gen, 10):
        for original, new in zip(texts, copy):
            total += 1
            if new == original:
                continue
            cut += 1
            lengths.append(len(new.split()))
            assert f" {new} " in f" {original} "  # A contiguous run of whole words.
    assert cut / total == pytest.approx(0.25, abs=0.02)  # 4,000 copies: sd 0.007
    assert set(lengths) == {1, 2, 3, 4, 5}
    shares = np.bincount(lengths, minlength=6)[1:] / len(lengths)
    np.testing.assert_allclose(shares, 0.2, atol=0.04)


def _examples(texts):
    return [data.Example(t, None, i % 2) for i, t in enumerate(texts)]


def test_n_iter_copies_per_example_without_duplicates():
    texts, tags = _tagged_corpus(n=50, length=20)
    tag_of_text = dict(zip(texts, tags))
    make = lambda ts: augment.TangGenerator(ts, augment.TangRules(p_mask=0.5, p_pos=0, p_ng=0),
                                            tags=[tag_of_text[t] for t in ts])
    result = augment.augment(_examples(texts), make, n_iter=7, seed=0)
    # With half the words masked, copies of 20 words essentially never repeat.
    assert len(result.examples) == 7 * 50 and result.rounds == 7
    unmasked = collections.Counter(
        " ".join(w for w in e.text_a.split() if w != augment.MASK) for e in result.examples)
    assert len({e.text_a for e in result.examples}) == len(result.examples)
    assert all(e.label == -1 and e.text_b is None for e in result.examples)
    assert result.examples_per_s > 0 and sum(unmasked.values()) == 350


def test_duplicates_of_originals_and_of_each_other_are_dropped():
    texts = ["good film", "good film", "bad plot"]
    tags = {"good film": ["JJ", "NN"], "bad plot": ["JJ", "NN"]}
    no_change = lambda ts: augment.TangGenerator(ts, augment.TangRules(p_mask=0, p_pos=0, p_ng=0),
                                                 tags=[tags[t] for t in ts])
    assert augment.augment(_examples(texts), no_change, n_iter=5).examples == []
    always_mask = lambda ts: augment.TangGenerator(
        ts, augment.TangRules(p_mask=1.0, p_pos=0, p_ng=0), tags=[tags[t] for t in ts])
    result = augment.augment(_examples(texts), always_mask, n_iter=5)
    assert [e.text_a for e in result.examples] == ["[MASK] [MASK]"]  # One survivor of 15.


def test_cap_stops_at_max_examples_spread_over_the_examples():
    texts, tags = _tagged_corpus(n=100, length=20)
    tag_of_text = dict(zip(texts, tags))
    make = lambda ts: augment.TangGenerator(ts, augment.TangRules(p_mask=0.5, p_pos=0, p_ng=0),
                                            tags=[tag_of_text[t] for t in ts])
    result = augment.augment(_examples(texts), make, n_iter=20, max_examples=150, seed=1)
    assert len(result.examples) == 150 and result.rounds == 2


@pytest.mark.parametrize("sides", ["first", "second", "both", "random"])
def test_pairs_augment_the_chosen_sides(sides):
    texts, tags = _tagged_corpus(n=60, length=10)
    tag_of_text = dict(zip(texts, tags))
    examples = [data.Example(texts[i], texts[i + 30], 0) for i in range(30)]
    make = lambda ts: augment.TangGenerator(ts, augment.TangRules(p_mask=0.4, p_pos=0, p_ng=0),
                                            tags=[tag_of_text[t] for t in ts])
    result = augment.augment(examples, make, n_iter=6, seed=0, pair_sides=sides)
    firsts = {e.text_a for e in examples}
    seconds = {e.text_b for e in examples}
    a_changed = np.array([e.text_a not in firsts for e in result.examples])
    b_changed = np.array([e.text_b not in seconds for e in result.examples])
    if sides == "first":
        assert a_changed.all() and not b_changed.any()
    elif sides == "second":
        assert b_changed.all() and not a_changed.any()
    elif sides == "both":
        assert (a_changed & b_changed).mean() > 0.9
    else:
        for share in (a_changed & ~b_changed, ~a_changed & b_changed, a_changed & b_changed):
            assert 0.2 < share.mean() < 0.47


def test_bad_probabilities_are_refused_naming_the_key():
    with pytest.raises(augment.AugmentError, match="p_mask.*p_pos"):
        augment.TangRules(p_mask=0.7, p_pos=0.5)
    with pytest.raises(augment.AugmentError, match="pair_sides"):
        augment.augment([data.Example("a", "b", 0)], None, n_iter=1, pair_sides="left")


def test_spacy_tagger_loads_offline_and_tags_penn_treebank():
    tag = augment.spacy_tagger()
    assert tag([["the", "movie", "was", "a", "great", "film"]]) == [
        ["DT", "NN", "VBD", "DT", "JJ", "NN"]]


# ------------------------------------------------------------------------------------------------
# TinyBERT


def _numpy_top_k(queries, table, k, exclude=None):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    t = table / np.linalg.norm(table, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ t.T.astype(np.float64)
    if exclude is not None:
        for i, j in enumerate(exclude):
            if j >= 0:
                scores[i, j] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_nearest_neighbours_match_a_numpy_cosine_top_k():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(37, 16)).astype(np.float32) * rng.uniform(0.1, 10, (37, 1))
    exclude = rng.integers(-1, 500, 37)
    got = augment.nearest_neighbours(queries, table, 15, exclude, chunk=16)  # Several chunks.
    np.testing.assert_array_equal(got, _numpy_top_k(queries, table, 15, exclude))


def test_tinybert_candidates_are_embedding_neighbours_and_replaced_at_rate_p_t(tiny_hf_dir):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    embeddings = np.random.default_rng(0).normal(size=(len(tokenizer), 8)).astype(np.float32)
    texts = ["the movie was a wonderful film", "it is not the plot , it is the acting"] * 100
    gen = augment.TinyBertGenerator(texts, tokenizer, embeddings, p_t=0.4, k=5)
    piece_ids, piece_tokens = augment.candidate_pieces(tokenizer)
    for word in ("movie", "wonderful", "acting"):  # "wonderful" is two pieces here or not.
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
        query = embeddings[ids].mean(0)[None]
        own = [list(piece_ids).index(ids[0])] if len(ids) == 1 and ids[0] in piece_ids else [-1]
        expected = [piece_tokens[i] for i in _numpy_top_k(query, embeddings[piece_ids], 5,
                                                          own)[0]]
        row = gen.candidates[gen.corpus.vocab.index(word)]
        assert [gen.corpus.vocab[i] for i in row] == expected
        assert word not in expected
    for stop in ("the", "was", "a", "it", "is", "not", ","):
        assert (gen.candidates[gen.corpus.vocab.index(stop)] == -1).all()
    replaced = total = 0
    for copy in _copies(gen, 5):
        for original, new in zip(texts, copy):
            for x, y in zip(original.split(), new.split()):
                if x in ("movie", "wonderful", "film", "plot", "acting"):
                    total += 1
                    replaced += x != y
                else:
                    assert x == y  # Stopwords and punctuation stay.
    assert replaced / total == pytest.approx(0.4, abs=0.03)  # 3,000 candidate words: sd 0.009


def test_augmentation_shows_a_progress_bar_only_when_asked(capsys):
    texts, tags = _tagged_corpus(n=20, length=10)
    tag_of_text = dict(zip(texts, tags))
    make = lambda ts: augment.TangGenerator(ts, augment.TangRules(p_mask=0.5, p_pos=0, p_ng=0),
                                            tags=[tag_of_text[t] for t in ts])
    quiet = augment.augment(_examples(texts), make, n_iter=3, seed=0)
    assert "augmentation" not in capsys.readouterr().err
    shown = augment.augment(_examples(texts), make, n_iter=3, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "augmentation" in err and "3/3" in err
    # The bar changes nothing of the result.
    assert [e.text_a for e in shown.examples] == [e.text_a for e in quiet.examples]
