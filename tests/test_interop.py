"""Foreign formats on tiny random models: concept files out to kohya / A1111 / diffusers and back, other tools
reading them, LoRA files fused and sampled, fused folders as one checkpoint, bad files refused by key, the CLI."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mixofshow import MixOfShowError, MixOfShowPipeline
from mixofshow.cli import main
from mixofshow.concept_file import load_concept, save_concept
from mixofshow.config import load_fuse_config
from mixofshow.fusion.fuse import fuse
from mixofshow.interop import (
    DIFFUSERS_LORA_FILE,
    export_concept,
    export_single_file,
    kohya_module_name,
    unet_to_original,
    vae_to_original,
)
from mixofshow.lora import lora_delta
from mixofshow.testing import random_concept, save_tiny_base, tiny_components
from mixofshow.tokens import ConceptVocabulary

PROMPT = "a photo of a cat on the grass"  # no concept words: every loader encodes it the same way
TRIGGER = "a photo of sks"


@pytest.fixture(scope="module")
def components():
    return tiny_components()


@pytest.fixture(scope="module")
def concept(components):
    """An ED-LoRA concept whose alpha is not its rank (scale 0.5), LoRA on the text encoder and the UNet."""
    made = random_concept(components, ("<k1>", "<k2>"), seed=1, lora_std=0.1)
    made.alpha = 2.0
    return made


def ours(components, concept=None):
    pipe = MixOfShowPipeline(**copy.deepcopy(components))
    if concept is not None:
        pipe.load_concept(concept)
    return pipe


def plain(components):
    return StableDiffusionPipeline(**copy.deepcopy(components), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def outputs(pipe, prompt=PROMPT, states=None):
    """(text-encoder hidden states of `prompt`, UNet output on fixed latents given `states` or those)."""
    if isinstance(pipe, MixOfShowPipeline):  # concept words bound to their tokens (one per word: no layers here)
        ids = pipe.layerwise_input_ids([prompt], None)[0]
    else:
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        noise = pipe.unet(latents, 500, encoder_hidden_states=text if states is None else states).sample
    return text, noise


def assert_same_outputs(pipe, reference, base):
    """Same text-encoder and UNet outputs as `reference`, which differs from `base` (so the LoRA is compared)."""
    text, noise = outputs(reference)
    _, base_noise = outputs(base, states=text)
    assert (text - outputs(base)[0]).abs().max() > 1e-3 and (noise - base_noise).abs().max() > 1e-4
    got_text, got_noise = outputs(pipe, states=text)
    torch.testing.assert_close(got_text, text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_noise, noise, rtol=1e-5, atol=1e-5)


# -- export: kohya / A1111 --------------------------------------------------------------------------------------


def test_kohya_file_layout_metadata_and_embeddings(tmp_path, concept):
    result = export_concept(concept, "kohya", tmp_path, name="kit")
    lora = tmp_path / "kit.safetensors"
    assert result.files[0] == lora and {p.name for p in result.files[1:]} == {"k1.safetensors", "k2.safetensors"}
    with safe_open(str(lora), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
        assert f.get_tensor(f"{module}.alpha").item() == 2.0
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight"} <= keys
        assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight" in keys
    assert len(keys) == 3 * (56 + 8)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"

    with safe_open(str(tmp_path / "k2.safetensors"), "pt") as f:
        emb, metadata = f.get_tensor("emb_params"), f.metadata()
    torch.testing.assert_close(emb, concept.embeddings["<k2>"].mean(dim=0, keepdim=True))
    assert metadata["mixofshow.word"] == "<k2>" and metadata["mixofshow.layers_averaged"] == "7"
    assert "mean over the 7 layers" in metadata["mixofshow.note"]
    assert any("mean over the 7 layers" in note for note in result.notes)
    assert any("<lora:kit:1> k1 k2" in note for note in result.notes)


def test_a1111_folder_layout(tmp_path, concept):
    result = export_concept(concept, "a1111", tmp_path, name="kit")
    assert {p.relative_to(tmp_path).as_posix() for p in result.files} == {
        "models/Lora/kit.safetensors", "embeddings/k1.safetensors", "embeddings/k2.safetensors"}


def test_an_embedding_never_overwrites_the_lora_beside_it(tmp_path, components):
    concept = random_concept(components, ("<kit>",), seed=5)
    files = export_concept(concept, "kohya", tmp_path, name="kit").files
    assert [p.name for p in files] == ["kit.safetensors", "kit_.safetensors"]


def test_kohya_round_trip_gives_the_same_outputs(tmp_path, components, concept):
    lora = export_concept(concept, "kohya", tmp_path / "kit.safetensors").files[0]
    imported = load_concept(lora)
    assert imported.words == () and (imported.rank, imported.alpha) == (4, 2.0)
    assert (imported.base.text_hidden_size, imported.base.cross_attention_dim) == (32, 32)
    for module, (down, up) in concept.unet_lora.items():
        torch.testing.assert_close(imported.unet_lora[module][0], down)
        torch.testing.assert_close(imported.unet_lora[module][1], up)
    assert_same_outputs(ours(components, lora), ours(components, concept), plain(components))


def test_feed_forward_lora_round_trips_through_kohya_and_diffusers_files(tmp_path, components):
    concept = random_concept(components, ("<k1>",), seed=3, unet_lora_layers="attention_ff")
    assert any(".ff.net." in module for module in concept.unet_lora)
    for fmt in ("kohya", "diffusers"):
        files = export_concept(concept, fmt, tmp_path / fmt).files
        imported = load_concept(next(f for f in files if f.name != "k1.safetensors"
                                     and f.suffix == ".safetensors"))
        assert sorted(imported.unet_lora) == sorted(concept.unet_lora)
        for module, (down, up) in concept.unet_lora.items():
            torch.testing.assert_close(lora_delta(*imported.unet_lora[module], imported.rank, imported.alpha),
                                       lora_delta(down, up, concept.rank, concept.alpha), rtol=1e-5, atol=1e-6)


def test_kohya_export_is_read_by_diffusers(tmp_path, components, concept):
    """diffusers' own kohya reader (a second opinion on the names and the alpha) gives our outputs."""
    lora = export_concept(concept, "kohya", tmp_path / "kit.safetensors").files[0]
    pipe = plain(components)
    pipe.load_lora_weights(str(lora))
    assert_same_outputs(pipe, ours(components, concept), plain(components))


# -- export: diffusers ------------------------------------------------------------------------------------------


def test_diffusers_export_matches_our_loader(tmp_path, components, concept):
    result = export_concept(concept, "diffusers", tmp_path / "out")
    assert result.files[0] == tmp_path / "out" / DIFFUSERS_LORA_FILE
    keys = set(load_file(result.files[0]))
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.out_proj.lora_B.weight" in keys
    pipe = plain(components)
    pipe.load_lora_weights(str(tmp_path / "out"))  # no adapter metadata: diffusers takes alpha = rank
    assert_same_outputs(pipe, ours(components, concept), plain(components))

    for path in result.files[1:]:  # ED-LoRA words become layer-averaged textual inversions
        pipe.load_textual_inversion(str(path))
    table = pipe.text_encoder.get_input_embeddings().weight
    row = table[pipe.tokenizer.convert_tokens_to_ids("<k1>")]
    torch.testing.assert_close(row, concept.embeddings["<k1>"].mean(dim=0))


def test_diffusers_export_with_one_embedding_per_word_is_exact(tmp_path, components):
    """A word with one embedding (mode `lora`) loses nothing: diffusers with the textual inversion encodes the
    concept's prompts as we do."""
    concept = random_concept(components, ("<w1>",), seed=3)
    concept.embeddings["<w1>"] = concept.embeddings["<w1>"][:1]
    concept.mode = "lora"
    result = export_concept(concept, "diffusers", tmp_path / "out")
    assert not any("mean over" in note for note in result.notes)
    pipe = plain(components)
    pipe.load_lora_weights(str(tmp_path / "out"))
    pipe.load_textual_inversion(str(result.files[1]))
    reference = ours(components, concept)
    text, noise = outputs(reference, "a photo of <w1> on the grass")
    got_text, got_noise = outputs(pipe, "a photo of <w1> on the grass", states=text)
    torch.testing.assert_close(got_text, text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_noise, noise, rtol=1e-5, atol=1e-5)


# -- import ---------------------------------------------------------------------------------------------------------


def test_diffusers_file_with_adapter_metadata_is_read_with_its_alpha(tmp_path, components):
    """A LoRA trained and saved by diffusers (alpha 2 at rank 4, one module at alpha 8) loads like diffusers
    loads it."""
    trained = plain(components)
    torch.manual_seed(0)
    special = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 8}
    for model, targets, alphas in ((trained.unet, ["to_q", "to_k", "to_v", "to_out.0"], special),
                                   (trained.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], {})):
        model.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=targets, alpha_pattern=alphas))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
    metadata = {}
    for part, model in (("unet", trained.unet), ("text_encoder", trained.text_encoder)):
        config = model.peft_config["default"].to_dict()
        metadata[part] = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(trained.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(trained.text_encoder),
        unet_lora_adapter_metadata=metadata["unet"], text_encoder_lora_adapter_metadata=metadata["text_encoder"])
    path = tmp_path / DIFFUSERS_LORA_FILE
    reference = plain(components)
    reference.load_lora_weights(str(tmp_path))
    imported = load_concept(path)
    assert imported.words == () and imported.config["format"] == "diffusers"
    assert len(imported.unet_lora) == 56 and len(imported.text_encoder_lora) == 8
    assert_same_outputs(ours(components, path), reference, plain(components))


def write_kohya(path, modules: dict, extra: dict | None = None):
    """A kohya file from `{module name: (down, up, alpha or None)}` plus raw `extra` tensors."""
    tensors = dict(extra or {})
    for name, (down, up, alpha) in modules.items():
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def test_mixed_ranks_and_alphas_are_kept_exactly(tmp_path):
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"
    text = "encoder.layers.1.self_attn.v_proj"
    g = torch.Generator().manual_seed(0)
    pairs = {("unet", q): (torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 1.0),
             ("unet", k): (torch.randn(8, 32, generator=g), torch.randn(32, 8, generator=g), 16.0),
             ("text_encoder", text): (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), None)}
    path = write_kohya(tmp_path / "mixed.safetensors",
                       {kohya_module_name(part, m): pair for (part, m), pair in pairs.items()})
    imported = load_concept(path)
    assert imported.rank == 8
    for (part, module), (down, up, alpha) in pairs.items():
        weights = imported.unet_lora if part == "unet" else imported.text_encoder_lora
        expected = up @ down * ((alpha or down.shape[0]) / down.shape[0])  # kohya: no alpha means alpha = rank
        got = lora_delta(*weights[module], imported.rank, imported.alpha)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layers_other_than_attention_and_feed_forward_are_skipped_with_a_warning(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    modules = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v": (
            torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g), 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": (
            torch.randn(4, 16, generator=g), torch.randn(128, 4, generator=g), 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in": (
            torch.randn(4, 16, 1, 1, generator=g), torch.randn(16, 4, 1, 1, generator=g), 4),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (
            torch.randn(4, 32, generator=g), torch.randn(37, 4, generator=g), 4),
    }
    with caplog.at_level(logging.WARNING):
        imported = load_concept(write_kohya(tmp_path / "community.safetensors", modules))
    assert "skipped LoRA on 2 layer(s)" in caplog.text
    assert sorted(imported.unet_lora) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
                                          "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"]
    assert not imported.text_encoder_lora and len(imported.config["skipped_modules"]) == 2


# -- bad input: refused, naming the file and the key ------------------------------------------------------------

DOWN, UP = torch.zeros(4, 32), torch.zeros(32, 4)
ATTN = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": DOWN},
         r"'lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight'.*SDXL"),
        ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": DOWN},
         r"'lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight'.*SDXL"),
        ({"lora_unet_single_blocks_0_linear1.lora_down.weight": DOWN, "lora_unet_single_blocks_0_linear1"
          ".lora_up.weight": UP}, r"'lora_unet_single_blocks_0_linear1.lora_down.weight'.*another model architecture"),
        ({f"{ATTN}.lora_down.weight": DOWN, f"{ATTN}.lora_up.weight": UP, f"{ATTN}.dora_scale": UP.clone()},
         rf"'{ATTN}.dora_scale'.*DoRA"),
        ({f"{ATTN}.lora_down.weight": DOWN, f"{ATTN}.lora_up.weight": UP.clone().fill_(float("nan"))},
         rf"'{ATTN}.lora_up.weight'.*NaN"),
        ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": DOWN},
         r"'text_encoder_2\..*another architecture"),
        ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": DOWN},
         r"'unet\.down_blocks.*to_q_lora\.down\.weight'.*old attention-processor format"),
        ({"conditioner.embedders.0.weight": DOWN}, r"not a mixofshow concept file.*'conditioner.embedders.0.weight'"),
    ],
    ids=["sdxl-text-encoder", "sdxl-unet", "not-sd", "dora", "nan", "diffusers-sdxl", "old-diffusers", "unknown"],
)
def test_bad_lora_files_are_refused_naming_file_and_key(tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(MixOfShowError, match=message) as error:
        load_concept(path)
    assert str(path) in str(error.value)


def test_lora_for_another_architecture_is_refused_by_the_model(tmp_path, components):
    """SD1.x names but SDXL sizes (2048-wide cross-attention), or a layer this model lacks: refused on loading,
    naming the file and the key, before anything changes."""
    to_k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    wide = write_kohya(tmp_path / "sdxl.safetensors", {to_k: (torch.zeros(4, 2048), torch.zeros(32, 4), 4)})
    pipe = ours(components)
    with pytest.raises(MixOfShowError, match=rf"{wide}: key '{to_k}.lora_down.weight' implies a cross attention "
                                             r"dim of 2048, this model's is 32"):
        pipe.load_concept(wide)
    deep = write_kohya(tmp_path / "deep.safetensors",
                       {"lora_te_text_model_encoder_layers_11_self_attn_q_proj": (DOWN, UP, 4)})
    with pytest.raises(MixOfShowError, match=rf"{deep}: text_encoder LoRA key 'encoder.layers.11.self_attn.q_proj' "
                                             "names no linear layer"):
        pipe.load_concept(deep)
    assert not pipe.adapter_scales


# -- a community LoRA in fusion; the fused model as one checkpoint ----------------------------------------------


@pytest.fixture(scope="module")
def fused(tmp_path_factory, components, concept):
    """One ED-LoRA concept file and one kohya LoRA (no words, a trigger prompt) fused by gradient fusion."""
    root = tmp_path_factory.mktemp("fusion")
    edlora = save_concept(random_concept(components, ("<e1>", "<e2>"), seed=2), root / "e.safetensors")
    kohya = export_concept(random_concept(components, ("<x1>",), seed=4), "kohya", root / "k.safetensors").files[0]
    config = load_fuse_config(None, concepts=[str(edlora), {"path": str(kohya), "prompts": [TRIGGER]}],
                              base="tiny", out=str(root / "fused"), method="gradient", sampling_steps=2)
    return fuse(config, components=tiny_components(), progress=False), kohya


def test_kohya_lora_fuses_and_samples(fused):
    folder, _ = fused
    report = json.loads((folder / "fusion_report.json").read_text())
    assert report["method"] == "gradient" and report["inputs"][1]["words"] == []
    pipe = MixOfShowPipeline.from_base(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe([TRIGGER, "a <e1> <e2> on the grass"], num_inference_steps=2, output_type="latent").images
    assert latents.shape == (2, 4, 16, 16) and torch.isfinite(latents).all()


def test_a_lora_without_words_needs_trigger_prompts(tmp_path, fused):
    _, kohya = fused
    config = load_fuse_config(None, concepts=[str(kohya)], base="tiny", out=str(tmp_path / "o"))
    with pytest.raises(MixOfShowError, match="no concept words: give its trigger prompts"):
        fuse(config, components=tiny_components(), progress=False)


def test_fused_single_file_loads_and_matches_the_folder(tmp_path, fused):
    folder, _ = fused
    result = export_single_file(folder, tmp_path / "fused.safetensors")
    checkpoint, manifest = result.files
    assert manifest.name == "fused.concepts.json" and manifest.read_text() == (folder / "concepts.json").read_text()
    assert any("14 concept tokens" in note for note in result.notes)
    single = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(folder), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    reference = StableDiffusionPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(single, name).state_dict(), getattr(reference, name).state_dict()
        assert set(got) == set(want), name
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), key

    # Sampled with its concept words through the manifest: the same latents as the folder.
    ours_single = MixOfShowPipeline(**{k: getattr(single, k) for k in ("vae", "text_encoder", "tokenizer", "unet",
                                                                        "scheduler")})
    tokens = json.loads(manifest.read_text())["tokens"]
    ours_single.concepts = ConceptVocabulary.from_json(tokens, ours_single.tokenizer, ours_single.num_layers)
    ours_folder = MixOfShowPipeline.from_base(folder)
    prompt = "a <e1> <e2> on the grass"
    for pipe in (ours_single, ours_folder):
        pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(ours_single(prompt, num_inference_steps=2, output_type="latent").images,
                               ours_folder(prompt, num_inference_steps=2, output_type="latent").images)


def test_single_file_keeps_the_folders_dtype(tmp_path, components):
    plain(components).to(torch.float16).save_pretrained(tmp_path / "half")
    checkpoint = export_single_file(tmp_path / "half", tmp_path / "half.safetensors").files[0]
    assert {t.dtype for t in load_file(checkpoint).values()} == {torch.float16}


def test_original_layout_is_what_diffusers_converts_back():
    """On SD1.5's block structure (narrow channels): the original names diffusers' converter maps back, exactly."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32,
                                attention_head_dim=8, sample_size=8)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    original = {"model.diffusion_model." + k: v for k, v in unet_to_original(unet.state_dict(), unet.config).items()}
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in original  # diffusers' "v1" probe
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in original  # upsampler of an up block without attn
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in original  # ... and of one with attention
    for model, converted in ((unet, convert_ldm_unet_checkpoint(original, unet.config)),
                             (vae, convert_ldm_vae_checkpoint(
                                 {"first_stage_model." + k: v for k, v in
                                  vae_to_original(vae.state_dict(), vae.config).items()}, vae.config))):
        state = model.state_dict()
        assert set(converted) == set(state)
        for key, tensor in state.items():
            assert torch.equal(converted[key], tensor), key


# -- the command ----------------------------------------------------------------------------------------------------


def test_cli_export(tmp_path, components, concept, capsys):
    path = save_concept(concept, tmp_path / "kit.safetensors")
    assert main(["export", str(path), "--format", "kohya", "--out", str(tmp_path / "kohya")]) == 0
    assert (tmp_path / "kohya" / "kit.safetensors").is_file() and (tmp_path / "kohya" / "k1.safetensors").is_file()
    shown = capsys.readouterr().out
    assert "wrote" in shown and "note: ED-LoRA keeps 7 embeddings per word" in shown
    assert main(["export", str(path), "--format", "a1111", "--out", str(tmp_path / "webui")]) == 0
    assert (tmp_path / "webui" / "models" / "Lora" / "kit.safetensors").is_file()
    assert main(["export", str(path), "--format", "diffusers", "--out", str(tmp_path / "diffusers")]) == 0
    assert (tmp_path / "diffusers" / DIFFUSERS_LORA_FILE).is_file()
    assert main(["inspect", str(tmp_path / "kohya" / "kit.safetensors")]) == 0
    base = save_tiny_base(tmp_path / "base")
    assert main(["export", str(base), "--format", "single-file", "--out", str(tmp_path / "base.safetensors")]) == 0
    assert (tmp_path / "base.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.safetensors", "--format", "kohya", "--out", "x"], "does not exist"),
        (["CONCEPT", "--format", "diffusers", "--out", "x.safetensors"], "is a folder"),
        (["CONCEPT", "--format", "single-file", "--out", "x.safetensors"], "not a diffusers model folder"),
    ],
)
def test_cli_export_errors(tmp_path, concept, capsys, args, message):
    path = save_concept(concept, tmp_path / "kit.safetensors")
    args = [str(path) if a == "CONCEPT" else str(tmp_path / a) if a.startswith("x") else a for a in args]
    assert main(["export", *args]) == 2
    assert message in capsys.readouterr().err
