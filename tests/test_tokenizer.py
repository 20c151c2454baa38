"""The shipped CLIP tokenizer reproduces real CLIP's ids, specials, padding and added-token behaviour."""

import pytest

from mixofshow.tokenizer import load_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def test_vocab_size_is_clips(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert len(tokenizer) == 49408


def test_special_token_ids(tokenizer):
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token_id == 49407


def test_model_max_length(tokenizer):
    assert tokenizer.model_max_length == 77


def test_known_clip_encoding(tokenizer):
    # Ids from CLIP's published vocabulary: a=320, photo=1125, of=539, cat=2368.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_normalisation_lowercases_and_collapses_whitespace(tokenizer):
    assert tokenizer("A  Photo\tof a CAT").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_girl_is_one_token(tokenizer):
    assert tokenizer.tokenize("girl") == ["girl</w>"]
    assert tokenizer("girl", add_special_tokens=False).input_ids == [1611]


def test_padding_to_max_length(tokenizer):
    encoded = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length)
    assert len(encoded.input_ids) == 77
    assert encoded.input_ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert encoded.input_ids[7:] == [49407] * 70
    assert sum(encoded.attention_mask) == 7


def test_truncation_keeps_77_ids(tokenizer):
    encoded = tokenizer("cat " * 200, truncation=True, max_length=tokenizer.model_max_length)
    assert len(encoded.input_ids) == 77
    assert encoded.input_ids[0] == 49406
    assert encoded.input_ids[-1] == 49407


def test_added_token_is_atomic():
    tokenizer = load_clip_tokenizer()  # fresh: adding tokens must not leak into the shared fixture
    assert tokenizer.add_tokens(["<hina1_0>"]) == 1
    assert tokenizer.convert_tokens_to_ids("<hina1_0>") == 49408
    assert len(tokenizer) == 49409
    assert tokenizer("a photo of <hina1_0> girl").input_ids == [49406, 320, 1125, 539, 49408, 1611, 49407]


def test_each_load_is_independent():
    first = load_clip_tokenizer()
    first.add_tokens(["<hina1_1>"])
    assert len(load_clip_tokenizer()) == 49408
