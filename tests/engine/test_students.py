"""Students: layer maps in the papers' index conventions, clear refusals, and initialisation
from teacher layers."""


import chex
import pytest
from flax import nnx

from kdjax import distill
from kdjax.models.bert import BertClassifier, BertConfig

TEACHER = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)


def test_layer_maps_follow_the_papers_index_conventions():
    assert distill.layer_map("uniform", 4, 12) == (3, 6, 9, 12)  # TinyBERT4: g(m) = 3m
    assert distill.layer_map("uniform", 3, 6) == (2, 4, 6)
    assert distill.layer_map("skip", 6, 12) == (2, 4, 6, 8, 10, 12)  # PKD-Skip {2,4,6,8,10}
    assert distill.layer_map("last", 6, 12) == (7, 8, 9, 10, 11, 12)  # PKD-Last {7..11}
    assert distill.layer_map("last", 3, 6) == (4, 5, 6)
    assert distill.layer_map("explicit", 2, 6, (1, 6)) == (1, 6)


@pytest.mark.parametrize("args, message", [
    (("uniform", 4, 6), "divide"),
    (("skip", 5, 12), "divide"),
    (("explicit", 3, 6, (2, 4)), "has 2 entries"),
    (("explicit", 2, 6, (0, 7)), "outside 1..6"),
    (("diagonal", 2, 6), "unknown layer map"),
    (("uniform", 8, 6), "student has 8 layers"),
])
def test_bad_layer_maps_are_refused_with_a_clear_message(args, message):
    with pytest.raises(distill.DistillError, match=message):
        distill.layer_map(*args)


def test_spread_and_first_layers():
    assert distill.spread_layers(12, 6) == (0, 2, 4, 7, 9, 11)  # The released DistilBERT.
    assert distill.spread_layers(6, 3) == (0, 2, 5)
    assert distill.first_layers(12, 6) == (0, 1, 2, 3, 4, 5)


def test_init_from_teacher_copies_the_chosen_layers():
    teacher = BertClassifier(TEACHER, 3, rngs=nnx.Rngs(0))
    student = BertClassifier(distill.student_config(TEACHER, layers=2), 3, rngs=nnx.Rngs(1))
    distill.init_from_teacher(student, teacher, (0, 3))
    for i, j in enumerate((0, 3)):
        chex.assert_trees_all_equal(nnx.state(student.bert.layers[i], nnx.Param),
                                    nnx.state(teacher.bert.layers[j], nnx.Param))
    chex.assert_trees_all_equal(nnx.state(student.bert.embeddings, nnx.Param),
                                nnx.state(teacher.bert.embeddings, nnx.Param))
    narrow = BertClassifier(distill.student_config(TEACHER, layers=2, hidden=8), 3,
                            rngs=nnx.Rngs(1))
    with pytest.raises(distill.DistillError, match="same hidden_size"):
        distill.init_from_teacher(narrow, teacher, (0, 3))
