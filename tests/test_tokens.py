"""Concept words: naming, initialisers, registration in tokenizer/text encoder, and per-layer prompt binding."""

import pytest
import torch

from mixofshow.errors import MixOfShowError
from mixofshow.testing import tiny_components
from mixofshow.tokenizer import load_clip_tokenizer
from mixofshow.tokens import (
    ConceptVocabulary,
    check_new_words,
    encode_layerwise,
    initial_embedding,
    layer_token_name,
    split_words,
)

NUM_LAYERS = 7
HIDDEN = 32
GIRL = 1611  # CLIP's id of "girl</w>"


@pytest.fixture(scope="module")
def base_tokenizer():
    """A tokenizer never modified by any test."""
    return load_clip_tokenizer()


@pytest.fixture
def model():
    """Fresh tokenizer + text encoder (adding a concept mutates both)."""
    components = tiny_components(0)
    return components["tokenizer"], components["text_encoder"]


def random_rows(layers, seed=0):
    return torch.randn(layers, HIDDEN, generator=torch.Generator().manual_seed(seed))


# -- naming ---------------------------------------------------------------------------------------------------------


def test_split_words():
    assert split_words("<hina1>+<hina2>") == ("<hina1>", "<hina2>")
    assert split_words(" <hina1> + <hina2>  <hina3>") == ("<hina1>", "<hina2>", "<hina3>")
    assert split_words("<cat1>") == ("<cat1>",)


@pytest.mark.parametrize("spec", ["", "  ", "+", " + "])
def test_split_words_rejects_empty(spec):
    with pytest.raises(MixOfShowError, match="no concept words"):
        split_words(spec)


def test_split_words_rejects_repeats():
    with pytest.raises(MixOfShowError, match="repeat"):
        split_words("<a1>+<a1>")


def test_layer_token_name():
    assert layer_token_name("<hina1>", 0) == "<hina1_0>"
    assert layer_token_name("<hina1>", 15) == "<hina1_15>"
    assert layer_token_name("hina1", 3) == "<hina1_3>"


# -- new words and initialisers -------------------------------------------------------------------------------------


def test_check_new_words_accepts_a_new_word(base_tokenizer):
    check_new_words(base_tokenizer, ("<hina1>", "<hina2>"), NUM_LAYERS)


@pytest.mark.parametrize("word", ["girl", "dog", "a"])
def test_check_new_words_rejects_existing_words(base_tokenizer, word):
    with pytest.raises(MixOfShowError, match="already exists"):
        check_new_words(base_tokenizer, (word,), NUM_LAYERS)


def test_check_new_words_rejects_spaces(base_tokenizer):
    with pytest.raises(MixOfShowError, match="without spaces"):
        check_new_words(base_tokenizer, ("<a b>",), NUM_LAYERS)


def test_check_new_words_rejects_a_word_already_added(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    with pytest.raises(MixOfShowError, match=r"'<hina1>' already exists.*<hina1_0>"):
        check_new_words(tokenizer, ("<hina1>",), NUM_LAYERS)
    with pytest.raises(MixOfShowError, match="already exists"):
        vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    # Another new word is still fine.
    check_new_words(tokenizer, ("<hina2>",), NUM_LAYERS)


def test_random_initialiser_has_requested_std(base_tokenizer):
    table = torch.zeros(4, 200_000)
    row = initial_embedding("<rand-0.013>", base_tokenizer, table, torch.Generator().manual_seed(0))
    assert row.shape == (200_000,)
    assert row.dtype == torch.float32
    assert abs(row.std().item() - 0.013) < 0.013 * 0.02
    assert abs(row.mean().item()) < 0.001


def test_random_initialiser_uses_the_generator(base_tokenizer):
    table = torch.zeros(4, 64)
    a = initial_embedding("<rand-0.5>", base_tokenizer, table, torch.Generator().manual_seed(3))
    b = initial_embedding("<rand-0.5>", base_tokenizer, table, torch.Generator().manual_seed(3))
    c = initial_embedding("<rand-0.5>", base_tokenizer, table, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_class_word_initialiser_copies_its_row(base_tokenizer):
    table = torch.randn(49408, 16, generator=torch.Generator().manual_seed(0))
    row = initial_embedding("girl", base_tokenizer, table, torch.Generator())
    assert torch.equal(row, table[GIRL])
    row[0] += 1  # a copy, not a view into the table
    assert not torch.equal(row, table[GIRL])


def test_multi_token_initialiser_is_refused_naming_pieces(base_tokenizer):
    table = torch.zeros(49408, 4)
    with pytest.raises(MixOfShowError, match=r"'blue car' is 2 tokens.*blue</w>.*car</w>"):
        initial_embedding("blue car", base_tokenizer, table, torch.Generator())


# -- vocabulary -----------------------------------------------------------------------------------------------------


def test_add_registers_tokens_and_writes_rows(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    rows = random_rows(NUM_LAYERS)
    token = vocabulary.add(tokenizer, text_encoder, "<hina1>", rows)
    assert token.layerwise
    assert len(token.layer_ids) == NUM_LAYERS
    assert tokenizer.convert_ids_to_tokens(list(token.layer_ids)) == [f"<hina1_{k}>" for k in range(NUM_LAYERS)]
    assert len(tokenizer) == 49408 + NUM_LAYERS
    table = text_encoder.get_input_embeddings().weight
    assert table.shape == (49408 + NUM_LAYERS, HIDDEN)
    assert torch.equal(table[list(token.layer_ids)].detach(), rows)
    assert "<hina1>" in vocabulary and vocabulary.words() == ["<hina1>"]


@pytest.mark.parametrize("shape", [(5, HIDDEN), (NUM_LAYERS, 16)])
def test_add_refuses_rows_of_another_model(model, shape):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    with pytest.raises(MixOfShowError, match="another base model"):
        vocabulary.add(tokenizer, text_encoder, "<hina1>", torch.zeros(shape))
    assert len(tokenizer) == 49408
    assert "<hina1>" not in vocabulary


def test_layer_input_ids_binds_each_layer(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    token = vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    prompts = ["a photo of <hina1> near the sea", "<hina1>, smiling"]
    ids = vocabulary.layer_input_ids(tokenizer, prompts)
    assert ids.shape == (NUM_LAYERS, 2, 77)
    where = ids[0] == token.layer_ids[0]
    assert where.sum(dim=1).tolist() == [1, 1]
    assert where[0, 4] and where[1, 1]  # after <bos> "a photo of"; right after <bos>
    for k in range(NUM_LAYERS):
        assert (ids[k][where] == token.layer_ids[k]).all()
        assert torch.equal(ids[k][~where], ids[0][~where])
    # Other positions are exactly the plain tokenization with the concept word removed.
    plain = tokenizer(["a photo of girl near the sea", "girl, smiling"], padding="max_length", max_length=77,
                      return_tensors="pt").input_ids
    assert torch.equal(ids[0][~where], plain[plain != GIRL])


def test_prompt_without_concept_words_gives_one_layer(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    ids = vocabulary.layer_input_ids(tokenizer, ["a photo of a cat"])
    assert ids.shape == (1, 1, 77)
    assert ids[0, 0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bind_replaces_every_occurrence(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    assert vocabulary.bind("a <hina1> and <hina1>'s dog") == "a <hina1_0> and <hina1_0>'s dog"
    assert vocabulary.bind("two <hina1>s") == "two <hina1_0>s"  # angle-bracket words delimit themselves


def test_plain_words_bind_only_as_whole_words(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    vocabulary.add(tokenizer, text_encoder, "zqx", random_rows(NUM_LAYERS))
    assert vocabulary.bind("a zqx dog, zqxs, azqx") == "a <zqx_0> dog, zqxs, azqx"


def test_single_row_word_has_the_same_id_in_every_layer(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    rows = random_rows(1)
    shared = vocabulary.add(tokenizer, text_encoder, "<cat1>", rows)
    assert not shared.layerwise
    assert len(set(shared.layer_ids)) == 1 and len(shared.layer_ids) == NUM_LAYERS
    assert len(tokenizer) == 49408 + 1
    assert torch.equal(text_encoder.get_input_embeddings().weight[shared.layer_ids[0]].detach(), rows[0])

    only_shared = vocabulary.layer_input_ids(tokenizer, ["a <cat1> on a sofa"])
    assert only_shared.shape == (1, 1, 77)
    assert only_shared[0, 0, 2] == shared.layer_ids[0]

    layered = vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    ids = vocabulary.layer_input_ids(tokenizer, ["<hina1> holding a <cat1>"])
    assert ids.shape == (NUM_LAYERS, 1, 77)
    for k in range(NUM_LAYERS):
        assert ids[k, 0, 1] == layered.layer_ids[k]
        assert ids[k, 0, 4] == shared.layer_ids[0]


def test_unknown_word_is_refused(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    with pytest.raises(MixOfShowError, match=r"<foo>.*known: <hina1>"):
        vocabulary.layer_input_ids(tokenizer, ["a <hina1> and a <foo>"])
    with pytest.raises(MixOfShowError, match="<foo>"):
        ConceptVocabulary(NUM_LAYERS).check_prompt("<foo>")
    # CLIP's own special tokens are not concept words.
    vocabulary.check_prompt("<|startoftext|> a <hina1>")


def test_json_round_trip(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    vocabulary.add(tokenizer, text_encoder, "<cat1>", random_rows(1))
    data = vocabulary.to_json(tokenizer)
    assert data["<hina1>"] == [f"<hina1_{k}>" for k in range(NUM_LAYERS)]
    assert data["<cat1>"] == ["<cat1_0>"] * NUM_LAYERS
    restored = ConceptVocabulary.from_json(data, tokenizer, NUM_LAYERS)
    assert restored.tokens == vocabulary.tokens
    assert restored.num_layers == NUM_LAYERS
    prompts = ["<hina1> and <cat1>", "a dog"]
    assert torch.equal(restored.layer_input_ids(tokenizer, prompts), vocabulary.layer_input_ids(tokenizer, prompts))


def test_from_json_refuses_another_tokenizer(model, base_tokenizer):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    data = vocabulary.to_json(tokenizer)
    with pytest.raises(MixOfShowError, match="<hina1>"):
        ConceptVocabulary.from_json(data, base_tokenizer, NUM_LAYERS)
    with pytest.raises(MixOfShowError, match="<hina1>"):
        ConceptVocabulary.from_json(data, tokenizer, 5)


def test_encode_layerwise_shape_and_layers(model):
    tokenizer, text_encoder = model
    vocabulary = ConceptVocabulary(NUM_LAYERS)
    vocabulary.add(tokenizer, text_encoder, "<hina1>", random_rows(NUM_LAYERS))
    ids = vocabulary.layer_input_ids(tokenizer, ["a <hina1>", "a dog"])
    with torch.no_grad():
        states = encode_layerwise(text_encoder, ids)
        for k in (0, 3, 6):
            torch.testing.assert_close(states[k], text_encoder(ids[k])[0], atol=1e-6, rtol=0)
    assert states.shape == (NUM_LAYERS, 2, 77, HIDDEN)
    assert not torch.allclose(states[0, 0], states[1, 0])  # the concept's rows differ per layer
    torch.testing.assert_close(states[0, 1], states[1, 1], atol=1e-6, rtol=0)  # "a dog" has no concept word
