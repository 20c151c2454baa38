"""The concept file: exact safetensors round trip, atomic writes, refusal of bad files, official .pth import."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixofshow.concept_file as concept_file_module
from mixofshow.concept_file import (
    FORMAT,
    METADATA_KEY,
    BaseFingerprint,
    ConceptFile,
    fingerprint,
    load_concept,
    save_concept,
)
from mixofshow.errors import MixOfShowError
from mixofshow.lora import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGET_PATTERN,
    add_lora,
    align_module_paths,
    check_lora_shapes,
    lora_delta,
    lora_layers,
)
from mixofshow.pipelines import MixOfShowPipeline
from mixofshow.testing import tiny_components

NUM_LAYERS = 7
HIDDEN = 32
RANK = 4


class NotATensor:
    """A custom object: pickles hold it only if the loader runs arbitrary code."""

    def __init__(self):
        self.payload = "anything"


@pytest.fixture(scope="module")
def lora_names():
    """Module paths of the LoRA layers the tiny model gets, with their (in, out) sizes."""
    components = tiny_components(0)
    names = {}
    for part, model, targets in (("text_encoder", components["text_encoder"], TEXT_ENCODER_TARGETS),
                                 ("unet", components["unet"], UNET_TARGET_PATTERN)):
        add_lora(model, targets, RANK, RANK, "probe")
        names[part] = {path: (layer.in_features, layer.out_features) for path, layer in lora_layers(model).items()}
    return names


def random_lora(shapes, generator):
    return {
        path: (torch.randn(RANK, fan_in, generator=generator), torch.randn(fan_out, RANK, generator=generator))
        for path, (fan_in, fan_out) in shapes.items()
    }


def make_concept(lora_names, seed=0) -> ConceptFile:
    generator = torch.Generator().manual_seed(seed)
    return ConceptFile(
        words=("<hina1>", "<hina2>"),
        embeddings={
            "<hina1>": torch.randn(NUM_LAYERS, HIDDEN, generator=generator),
            "<hina2>": torch.randn(NUM_LAYERS, HIDDEN, generator=generator),
        },
        text_encoder_lora=random_lora(lora_names["text_encoder"], generator),
        unet_lora=random_lora(lora_names["unet"], generator),
        rank=RANK,
        alpha=2.5,
        base=BaseFingerprint(NUM_LAYERS, HIDDEN, HIDDEN, 49408, "ab" * 32),
        initializers=("<rand-0.013>", "girl"),
        mode="edlora",
        config={"steps": 10, "lr": {"text": 1e-5, "unet": 1e-4}, "note": "ünïcode"},
    )


def assert_same_concept(a: ConceptFile, b: ConceptFile):
    assert a.words == b.words
    assert a.rank == b.rank and a.alpha == b.alpha
    assert a.base == b.base
    assert a.initializers == b.initializers
    assert a.mode == b.mode
    assert a.config == b.config
    assert a.embeddings.keys() == b.embeddings.keys()
    for word in a.embeddings:
        assert torch.equal(a.embeddings[word], b.embeddings[word])
    for part in ("text_encoder_lora", "unet_lora"):
        left, right = getattr(a, part), getattr(b, part)
        assert left.keys() == right.keys()
        for module in left:
            assert torch.equal(left[module][0], right[module][0])
            assert torch.equal(left[module][1], right[module][1])


# -- round trip and atomic write ------------------------------------------------------------------------------------


def test_lora_names_cover_the_tiny_model(lora_names):
    assert len(lora_names["text_encoder"]) == 2 * 4  # 2 layers x q, k, v, out
    assert len(lora_names["unet"]) == 2 * NUM_LAYERS * 4  # attn1 + attn2 per transformer block
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in lora_names["unet"]
    assert "encoder.layers.0.self_attn.q_proj" in lora_names["text_encoder"]


def test_round_trip_is_exact(lora_names, tmp_path):
    concept = make_concept(lora_names)
    path = save_concept(concept, tmp_path / "sub" / "hina.safetensors")
    assert path == tmp_path / "sub" / "hina.safetensors"
    loaded = load_concept(path)
    assert_same_concept(concept, loaded)
    assert os.listdir(tmp_path / "sub") == ["hina.safetensors"]


def test_saved_metadata(lora_names, tmp_path):
    concept = make_concept(lora_names)
    path = save_concept(concept, tmp_path / "hina.safetensors")
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = json.loads(header["__metadata__"][METADATA_KEY])
    assert meta["format"] == FORMAT
    assert meta["words"] == ["<hina1>", "<hina2>"]
    assert meta["layer_count"] == NUM_LAYERS
    assert meta["rank"] == RANK and meta["alpha"] == 2.5
    assert "embeddings.<hina1>" in header
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A" in header


def test_fingerprint_of_the_tiny_model():
    components = tiny_components(0)
    fp = fingerprint(components["tokenizer"], components["text_encoder"], components["unet"])
    assert (fp.cross_attention_layers, fp.text_hidden_size, fp.cross_attention_dim, fp.base_vocab_size) == (
        NUM_LAYERS, HIDDEN, HIDDEN, 49408)
    assert fp == fingerprint(*(tiny_components(0)[k] for k in ("tokenizer", "text_encoder", "unet")))
    other = fingerprint(*(tiny_components(1)[k] for k in ("tokenizer", "text_encoder", "unet")))
    assert fp.same_weights(other) is False

    # The same base in another dtype is the same base (a float32-trained concept samples in float16 on a GPU).
    for dtype in (torch.float16, torch.bfloat16):
        components = tiny_components(0)
        for name in ("text_encoder", "unet"):
            components[name].to(dtype)
        assert fp.same_weights(fingerprint(*(components[k] for k in ("tokenizer", "text_encoder", "unet"))))
    legacy = BaseFingerprint(*dataclasses.astuple(fp)[:4], weights_sha256="ab")
    assert legacy.same_weights(fp) is None and fp.same_weights(legacy) is None
    assert legacy.same_weights(BaseFingerprint(*dataclasses.astuple(fp)[:4], weights_sha256="cd")) is False


def test_failed_write_leaves_existing_file_and_no_temp(lora_names, tmp_path, monkeypatch):
    path = tmp_path / "hina.safetensors"
    save_concept(make_concept(lora_names, seed=0), path)
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(concept_file_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_concept(make_concept(lora_names, seed=1), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["hina.safetensors"]
    assert_same_concept(load_concept(path), make_concept(lora_names, seed=0))


# -- bad files ------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(MixOfShowError, match="does not exist"):
        load_concept(tmp_path / "nope.safetensors")


def test_text_file_renamed(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is not a tensor file\n")
    with pytest.raises(MixOfShowError, match="not a readable safetensors file"):
        load_concept(path)


def test_safetensors_without_our_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"embeddings.<a1>": torch.zeros(NUM_LAYERS, HIDDEN)}, str(path))
    with pytest.raises(MixOfShowError, match="not a mixofshow concept file"):
        load_concept(path)


def test_nan_tensor_is_named(lora_names, tmp_path):
    concept = make_concept(lora_names)
    concept.embeddings["<hina2>"][3, 5] = float("nan")
    path = save_concept(concept, tmp_path / "nan.safetensors")
    with pytest.raises(MixOfShowError, match=r"'embeddings\.<hina2>'.*NaN"):
        load_concept(path)


def test_infinite_lora_is_named(lora_names, tmp_path):
    concept = make_concept(lora_names)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    concept.unet_lora[module][1][0, 0] = float("inf")
    path = save_concept(concept, tmp_path / "inf.safetensors")
    with pytest.raises(MixOfShowError, match=rf"'unet\.{module}\.lora_B'"):
        load_concept(path)


def rewrite_with(path, extra=None, drop=None, meta_update=None):
    """Re-save a concept file's tensors with extra/dropped keys or changed metadata."""
    tensors = load_file(str(path))
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = json.loads(header["__metadata__"][METADATA_KEY])
    meta.update(meta_update or {})
    tensors.update(extra or {})
    for key in drop or ():
        del tensors[key]
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def test_unexpected_key(lora_names, tmp_path):
    path = save_concept(make_concept(lora_names), tmp_path / "x.safetensors")
    rewrite_with(path, extra={"vae.decoder.weight": torch.zeros(2)})
    with pytest.raises(MixOfShowError, match=r"unexpected tensor 'vae\.decoder\.weight'"):
        load_concept(path)


def test_missing_lora_half(lora_names, tmp_path):
    path = save_concept(make_concept(lora_names), tmp_path / "x.safetensors")
    rewrite_with(path, drop=["text_encoder.encoder.layers.0.self_attn.q_proj.lora_B"])
    with pytest.raises(MixOfShowError, match="lacks lora_A or lora_B"):
        load_concept(path)


def test_words_must_match_embeddings(lora_names, tmp_path):
    path = save_concept(make_concept(lora_names), tmp_path / "x.safetensors")
    rewrite_with(path, meta_update={"words": ["<hina1>", "<hina3>"]})
    with pytest.raises(MixOfShowError, match="do not match embeddings"):
        load_concept(path)


@pytest.mark.parametrize("update", [{"format": "other"}, {"format_version": 99}, {"rank": "four"}, {"base": {}}])
def test_broken_metadata(lora_names, tmp_path, update):
    path = save_concept(make_concept(lora_names), tmp_path / "x.safetensors")
    rewrite_with(path, meta_update=update)
    with pytest.raises(MixOfShowError, match="broken concept metadata"):
        load_concept(path)


# -- official .pth import -------------------------------------------------------------------------------------------

TE_MODULE = "text_model.encoder.layers.0.self_attn.q_proj"  # official files use transformers 4.x paths
UNET_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def official_params(generator):
    return {
        "new_concept_embedding": {
            "<a1>": torch.randn(NUM_LAYERS, HIDDEN, generator=generator),
            "<a2>": torch.randn(NUM_LAYERS, HIDDEN, generator=generator),
        },
        "text_encoder": {
            f"{TE_MODULE}.lora_down.weight": torch.randn(RANK, HIDDEN, generator=generator),
            f"{TE_MODULE}.lora_up.weight": torch.randn(HIDDEN, RANK, generator=generator),
        },
        "unet": {
            f"{UNET_MODULE}.lora_down.weight": torch.randn(RANK, HIDDEN, generator=generator),
            f"{UNET_MODULE}.lora_up.weight": torch.randn(16, RANK, generator=generator),
        },
    }


def test_official_import(tmp_path):
    params = official_params(torch.Generator().manual_seed(0))
    path = tmp_path / "official.pth"
    torch.save({"params": params}, path)
    concept = load_concept(path)
    assert concept.words == ("<a1>", "<a2>")
    for word in concept.words:
        assert torch.equal(concept.embeddings[word], params["new_concept_embedding"][word])
    assert set(concept.text_encoder_lora) == {TE_MODULE}
    assert set(concept.unet_lora) == {UNET_MODULE}
    assert concept.rank == RANK
    assert concept.base.cross_attention_layers == NUM_LAYERS
    assert concept.base.text_hidden_size == HIDDEN
    assert concept.base.cross_attention_dim == HIDDEN
    for lora, part, module in ((concept.text_encoder_lora, "text_encoder", TE_MODULE),
                               (concept.unet_lora, "unet", UNET_MODULE)):
        down, up = lora[module]
        assert torch.equal(down, params[part][f"{module}.lora_down.weight"])
        assert torch.equal(up, params[part][f"{module}.lora_up.weight"])
        # Official LoRA: alpha 1 times up(down(x)), no division by rank.
        torch.testing.assert_close(lora_delta(down, up, concept.rank, concept.alpha), 1.0 * up @ down,
                                   atol=1e-5, rtol=1e-5)


def test_official_import_applies_official_scaling_in_the_pipeline(tmp_path):
    params = official_params(torch.Generator().manual_seed(1))
    path = tmp_path / "official.pth"
    torch.save({"params": params}, path)
    pipe = MixOfShowPipeline(**tiny_components(0))
    pipe.load_concept(path, scale=1.0)
    modules = dict(pipe.text_encoder.named_modules())
    # transformers 5.x's CLIPTextModel has no `text_model.` level; 4.x has.
    layer = modules[TE_MODULE] if TE_MODULE in modules else modules[TE_MODULE.removeprefix("text_model.")]
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(2))
    down = params["text_encoder"][f"{TE_MODULE}.lora_down.weight"]
    up = params["text_encoder"][f"{TE_MODULE}.lora_up.weight"]
    with torch.no_grad():
        delta = layer(x) - layer.get_base_layer()(x)
    torch.testing.assert_close(delta, x @ (up @ down).T, atol=1e-5, rtol=1e-5)


class Wrapped(torch.nn.Module):
    """The transformers 4.x layout: the text encoder's layers under `text_model.`."""

    def __init__(self, inner):
        super().__init__()
        self.text_model = inner


def test_align_module_paths_maps_between_text_encoder_layouts():
    text_encoder = tiny_components(0)["text_encoder"]
    pair = (torch.zeros(RANK, HIDDEN), torch.zeros(HIDDEN, RANK))
    flat, nested = "encoder.layers.1.self_attn.v_proj", "text_model.encoder.layers.1.self_attn.v_proj"
    for model, have in ((text_encoder, flat), (Wrapped(text_encoder), nested)):
        for given in (flat, nested):
            aligned = align_module_paths(model, {given: pair})
            assert list(aligned) == [have]
            assert aligned[have] is pair
            check_lora_shapes(model, aligned, "text_encoder", "test")
    # Paths that fit neither layout are left for check_lora_shapes to refuse.
    assert list(align_module_paths(text_encoder, {"nope.q_proj": pair})) == ["nope.q_proj"]
    with pytest.raises(MixOfShowError, match="'nope.q_proj' names no linear layer"):
        check_lora_shapes(text_encoder, {"nope.q_proj": pair}, "text_encoder", "test")


def test_official_import_refuses_pickled_objects(tmp_path):
    params = official_params(torch.Generator().manual_seed(0))
    params["extra"] = NotATensor()
    path = tmp_path / "evil.pth"
    torch.save({"params": params}, path)
    with pytest.raises(MixOfShowError, match="weights_only=True"):
        load_concept(path)


def test_official_import_refuses_other_pickles(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(MixOfShowError, match="not an official ED-LoRA file"):
        load_concept(path)
    torch.save({"params": {"new_concept_embedding": {"<a1>": torch.zeros(NUM_LAYERS, HIDDEN)},
                           "unet": {"x.weight": torch.zeros(2, 2)}}}, path)
    with pytest.raises(MixOfShowError, match=r"unexpected unet key 'x\.weight'"):
        load_concept(path)
