"""`MixOfShowPipeline` on the tiny model: loading concept files, LoRA scales, seeds, refusals, parity, save/load."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from mixofshow.attention import AttentionMapRecorder
from mixofshow.concept_file import ConceptFile, fingerprint, save_concept
from mixofshow.errors import MixOfShowError
from mixofshow.lora import TEXT_ENCODER_TARGETS, UNET_TARGET_PATTERN, add_lora, lora_layers
from mixofshow.pipelines import SCHEDULERS, MixOfShowPipeline
from mixofshow.testing import tiny_components

NUM_LAYERS = 7
HIDDEN = 32
RANK = 2
WORD = "<hina1>"
CONCEPT_PROMPT = f"a photo of {WORD} near the sea"
PLAIN_PROMPT = "a photo of a girl near the sea"


@pytest.fixture(scope="module")
def base():
    """LoRA module shapes and the base fingerprint of `tiny_components(0)`."""
    components = tiny_components(0)
    fp = fingerprint(components["tokenizer"], components["text_encoder"], components["unet"])
    shapes = {}
    for part, model, targets in (("text_encoder", components["text_encoder"], TEXT_ENCODER_TARGETS),
                                 ("unet", components["unet"], UNET_TARGET_PATTERN)):
        add_lora(model, targets, RANK, RANK, "probe")
        shapes[part] = {path: (layer.in_features, layer.out_features) for path, layer in lora_layers(model).items()}
    return {"fingerprint": fp, "shapes": shapes}


def make_concept(base, rows=None, words=(WORD,), seed=0, fingerprint_override=None) -> ConceptFile:
    """A random ED-LoRA concept for the tiny model (LoRA B nonzero, so the LoRA changes the model)."""
    generator = torch.Generator().manual_seed(seed)

    def lora(shapes):
        return {
            path: (0.3 * torch.randn(RANK, fan_in, generator=generator),
                   0.3 * torch.randn(fan_out, RANK, generator=generator))
            for path, (fan_in, fan_out) in shapes.items()
        }

    embeddings = {}
    for word in words:
        embeddings[word] = rows.clone() if rows is not None else torch.randn(NUM_LAYERS, HIDDEN, generator=generator)
    return ConceptFile(
        words=tuple(words),
        embeddings=embeddings,
        text_encoder_lora=lora(base["shapes"]["text_encoder"]),
        unet_lora=lora(base["shapes"]["unet"]),
        rank=RANK,
        alpha=RANK,
        base=fingerprint_override or base["fingerprint"],
    )


@pytest.fixture(scope="module")
def concept_path(base, tmp_path_factory):
    return save_concept(make_concept(base), tmp_path_factory.mktemp("concepts") / "hina.safetensors")


def new_pipeline(seed=0):
    return MixOfShowPipeline(**tiny_components(seed))


def sample(pipe, prompt, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "latent", "seed": seed, "progress": False, **kwargs}
    return pipe(prompt, **kwargs).images


# -- concepts and scales --------------------------------------------------------------------------------------------


def test_concept_loads(concept_path):
    pipe = new_pipeline()
    name = pipe.load_concept(concept_path, 0.8)
    assert name == "hina1"
    assert pipe.adapter_scales == {"hina1": 0.8}
    assert WORD in pipe.concepts
    assert len(pipe.tokenizer) == 49408 + NUM_LAYERS
    out = sample(pipe, CONCEPT_PROMPT)
    assert out.shape == (1, 4, 16, 16)
    assert torch.isfinite(out).all()


def test_recording_attention_keeps_each_layers_maps_while_open(concept_path):
    pipe = new_pipeline()
    pipe.load_concept(concept_path)
    recorder = AttentionMapRecorder(torch.tensor([[4], [4]]))  # [negative; prompt], the word's position
    with pipe.recording_attention(recorder):
        recorded = sample(pipe, CONCEPT_PROMPT)
    assert len(recorder.maps) == 2 * NUM_LAYERS  # two steps, every cross-attention layer
    assert {m.shape[0] for m in recorder.maps} == {2} and {m.shape[1] for m in recorder.maps} > {16 * 16}
    torch.testing.assert_close(recorded, sample(pipe, CONCEPT_PROMPT), atol=1e-4, rtol=1e-4)  # (explicit softmax)
    assert len(recorder.maps) == 2 * NUM_LAYERS  # nothing recorded after the block


def test_scale_zero_without_concept_words_is_the_base_model(concept_path):
    plain = sample(new_pipeline(), PLAIN_PROMPT)
    pipe = new_pipeline()
    pipe.load_concept(concept_path, 0.0)
    torch.testing.assert_close(sample(pipe, PLAIN_PROMPT), plain, atol=1e-6, rtol=0)
    # ... and the LoRA is really there: at scale 1 the same prompt changes.
    pipe.set_concept_scale("hina1", 1.0)
    assert (sample(pipe, PLAIN_PROMPT) - plain).abs().max() > 1e-4


def test_scales_change_the_output(concept_path):
    low, high = new_pipeline(), new_pipeline()
    low.load_concept(concept_path, 0.7)
    high.load_concept(concept_path, 1.0)
    at_low, at_high = sample(low, CONCEPT_PROMPT), sample(high, CONCEPT_PROMPT)
    assert (at_low - at_high).abs().max() > 1e-4
    # set_concept_scale reaches the same state as loading at that scale.
    high.set_concept_scale("hina1", 0.7)
    torch.testing.assert_close(sample(high, CONCEPT_PROMPT), at_low, atol=1e-6, rtol=0)


def test_set_concept_scale_unknown_name(concept_path):
    pipe = new_pipeline()
    pipe.load_concept(concept_path)
    with pytest.raises(MixOfShowError, match="no concept adapter 'nope'"):
        pipe.set_concept_scale("nope", 1.0)


def test_non_finite_scale_is_refused(concept_path):
    pipe = new_pipeline()
    with pytest.raises(MixOfShowError, match="finite"):
        pipe.load_concept(concept_path, float("nan"))
    assert WORD not in pipe.concepts


def test_seeds(concept_path):
    pipe = new_pipeline()
    pipe.load_concept(concept_path)
    first = sample(pipe, CONCEPT_PROMPT, seed=3)
    assert torch.equal(sample(pipe, CONCEPT_PROMPT, seed=3), first)
    assert (sample(pipe, CONCEPT_PROMPT, seed=4) - first).abs().max() > 1e-3
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(sample(pipe, CONCEPT_PROMPT, seed=None, generator=generator), first)


def test_concept_word_changes_the_output(concept_path):
    pipe = new_pipeline()
    pipe.load_concept(concept_path, 0.0)
    assert (sample(pipe, CONCEPT_PROMPT) - sample(pipe, PLAIN_PROMPT)).abs().max() > 1e-4


# -- refusals -------------------------------------------------------------------------------------------------------


def test_unknown_word_is_refused_before_denoising(concept_path):
    pipe = new_pipeline()
    pipe.load_concept(concept_path)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(2))
    with pytest.raises(MixOfShowError, match="<zzz>"):
        sample(pipe, f"{WORD} and <zzz>")
    with pytest.raises(MixOfShowError, match="<zzz>"):
        sample(pipe, CONCEPT_PROMPT, negative_prompt="<zzz>")
    assert calls == []
    sample(pipe, CONCEPT_PROMPT)  # the hooks do count real calls
    assert calls


@pytest.mark.parametrize("height", [18, -16, 0])
def test_bad_size_is_refused(height):
    # Tiny model: VAE factor 2, one UNet downsampling, so sizes go in steps of 4.
    with pytest.raises(MixOfShowError, match=f"height must be a positive multiple of 4 for this model, got {height}"):
        sample(new_pipeline(), PLAIN_PROMPT, height=height)


def test_other_sizes_sample():
    assert sample(new_pipeline(), PLAIN_PROMPT, height=24, width=40).shape == (1, 4, 12, 20)


def assert_unchanged(pipe):
    assert len(pipe.tokenizer) == 49408
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == 49408
    assert pipe.concepts.words() == []
    assert pipe.adapter_scales == {}
    assert not lora_layers(pipe.unet) and not lora_layers(pipe.text_encoder)


def test_concept_of_another_layer_count_is_refused(base, tmp_path):
    fp = base["fingerprint"]
    other = type(fp)(5, fp.text_hidden_size, fp.cross_attention_dim, fp.base_vocab_size, fp.weights_sha256)
    path = save_concept(make_concept(base, rows=torch.randn(5, HIDDEN), fingerprint_override=other),
                        tmp_path / "five.safetensors")
    pipe = new_pipeline()
    with pytest.raises(MixOfShowError, match="another base model"):
        pipe.load_concept(path)
    assert_unchanged(pipe)


def test_embeddings_of_another_layer_count_are_refused(base, tmp_path):
    # The fingerprint claims this model but the rows say otherwise: still refused, nothing half-loaded.
    path = save_concept(make_concept(base, rows=torch.randn(5, HIDDEN)), tmp_path / "five.safetensors")
    pipe = new_pipeline()
    with pytest.raises(MixOfShowError, match="another base model"):
        pipe.load_concept(path)
    assert_unchanged(pipe)


def test_refusal_of_a_later_word_leaves_the_pipeline_unchanged(base):
    concept = make_concept(base, words=("<ok1>", "<bad1>"))
    concept.embeddings["<bad1>"] = torch.randn(5, HIDDEN)
    pipe = new_pipeline()
    with pytest.raises(MixOfShowError, match="<bad1>.*another base model"):
        pipe.load_concept(concept)
    assert_unchanged(pipe)
    # The fixed concept loads afterwards.
    concept.embeddings["<bad1>"] = torch.randn(NUM_LAYERS, HIDDEN)
    pipe.load_concept(concept)
    assert pipe.concepts.words() == ["<ok1>", "<bad1>"]


def test_concept_of_another_hidden_size_is_refused(base, tmp_path):
    fp = base["fingerprint"]
    other = type(fp)(NUM_LAYERS, 16, fp.cross_attention_dim, fp.base_vocab_size, "")
    concept = make_concept(base, rows=torch.randn(NUM_LAYERS, 16), fingerprint_override=other)
    concept.text_encoder_lora, concept.unet_lora = {}, {}
    path = save_concept(concept, tmp_path / "narrow.safetensors")
    pipe = new_pipeline()
    with pytest.raises(MixOfShowError, match="another base model: its text hidden size is 16"):
        pipe.load_concept(path)
    assert_unchanged(pipe)


def test_loading_the_same_concept_twice_is_refused(concept_path):
    pipe = new_pipeline()
    pipe.load_concept(concept_path)
    before = sample(pipe, CONCEPT_PROMPT)
    with pytest.raises(MixOfShowError, match="already loaded"):
        pipe.load_concept(concept_path)
    with pytest.raises(MixOfShowError, match="already loaded"):
        pipe.load_concept(concept_path, name="another")
    assert pipe.adapter_scales == {"hina1": 1.0}
    torch.testing.assert_close(sample(pipe, CONCEPT_PROMPT), before, atol=0, rtol=0)


def test_two_concepts_load_side_by_side(base, concept_path):
    pipe = new_pipeline()
    pipe.load_concept(concept_path, 1.0)
    other = make_concept(base, words=("<cat1>",), seed=5)
    assert pipe.load_concept(other, 0.5) == "cat1"
    assert pipe.adapter_scales == {"hina1": 1.0, "cat1": 0.5}
    out = sample(pipe, f"{WORD} holding <cat1>")
    assert torch.isfinite(out).all()


# -- parity ---------------------------------------------------------------------------------------------------------


def test_identical_layer_rows_match_a_single_row_word(base):
    row = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(7))
    layered, shared = new_pipeline(), new_pipeline()
    layered.load_concept(make_concept(base, rows=row.repeat(NUM_LAYERS, 1)))
    shared.load_concept(make_concept(base, rows=row))
    ids = layered.concepts.layer_input_ids(layered.tokenizer, [CONCEPT_PROMPT])
    assert ids.shape[0] == NUM_LAYERS  # the layer-wise path is really taken
    assert shared.concepts.layer_input_ids(shared.tokenizer, [CONCEPT_PROMPT]).shape[0] == 1
    a, b = sample(layered, CONCEPT_PROMPT), sample(shared, CONCEPT_PROMPT)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_layerwise_rows_matter(base):
    rows = torch.randn(NUM_LAYERS, HIDDEN, generator=torch.Generator().manual_seed(7))
    one, other = new_pipeline(), new_pipeline()
    one.load_concept(make_concept(base, rows=rows))
    changed = rows.clone()
    changed[4] = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(8))
    other.load_concept(make_concept(base, rows=changed))
    assert (sample(one, CONCEPT_PROMPT) - sample(other, CONCEPT_PROMPT)).abs().max() > 1e-5


# -- schedulers and saving ------------------------------------------------------------------------------------------


def test_use_scheduler():
    pipe = new_pipeline()
    ddim = sample(pipe, PLAIN_PROMPT)
    pipe.use_scheduler("euler")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    euler = sample(pipe, PLAIN_PROMPT)
    assert euler.shape == ddim.shape and torch.isfinite(euler).all()
    assert (euler - ddim).abs().max() > 1e-4
    with pytest.raises(MixOfShowError, match="unknown scheduler 'heun'.*euler"):
        pipe.use_scheduler("heun")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps", [1, 3])
def test_every_scheduler_samples_with_one_unet_call_per_step(name, steps):
    pipe = new_pipeline()
    pipe.use_scheduler(name)
    assert isinstance(pipe.scheduler, SCHEDULERS[name])
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    assert torch.isfinite(sample(pipe, PLAIN_PROMPT, num_inference_steps=steps)).all()
    # PLMS evaluates its first step twice (as Stable Diffusion's PNDM always has); no PRK warm-up steps.
    assert len(calls) == steps + (name == "pndm" and steps > 1)


def test_save_pretrained_and_from_base(tmp_path):
    pipe = new_pipeline()
    original = sample(pipe, PLAIN_PROMPT)
    pipe.save_pretrained(tmp_path / "base")
    reloaded = MixOfShowPipeline.from_base(tmp_path / "base")
    assert isinstance(reloaded, MixOfShowPipeline)
    assert reloaded.num_layers == NUM_LAYERS
    assert reloaded.base_fingerprint == pipe.base_fingerprint
    torch.testing.assert_close(sample(reloaded, PLAIN_PROMPT), original, atol=1e-6, rtol=0)
    assert (sample(new_pipeline(seed=1), PLAIN_PROMPT) - original).abs().max() > 1e-4


def test_from_base_refuses_missing_folder(tmp_path):
    with pytest.raises(MixOfShowError, match="does not exist"):
        MixOfShowPipeline.from_base(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixOfShowError, match="model_index.json"):
        MixOfShowPipeline.from_base(tmp_path / "empty")


def test_decoded_output():
    images = sample(new_pipeline(), PLAIN_PROMPT, output_type="np")
    assert images.shape == (1, 32, 32, 3)
    assert images.min() >= 0 and images.max() <= 1
