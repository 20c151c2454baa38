"""Center-node fusion end to end on tiny random models: exactness, quality against weight fusion, statistics files,
fused folders, renaming, bad input."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from mixofshow import MixOfShowError, MixOfShowPipeline, load_concept
from mixofshow.cli import main
from mixofshow.concept_file import save_concept
from mixofshow.config import load_fuse_config
from mixofshow.fusion.fuse import compute_statistics, fuse
from mixofshow.testing import random_concept, save_tiny_base, tiny_components

WORDS = [("<a1>", "<a2>"), ("<b1>", "<b2>"), ("<c1>", "<c2>")]


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    """Three random ED-LoRA concepts with ED-LoRA's balance: a 10x smaller text-encoder LoRA than the UNet's."""
    root = tmp_path_factory.mktemp("concepts")
    base = tiny_components()
    return [save_concept(random_concept(base, words, seed=i, lora_std=0.1, text_encoder_lora_std=0.01),
                         root / f"c{i}.safetensors") for i, words in enumerate(WORDS)]


def run_fusion(tmp_path, paths, method="gradient", name="fused", **fields):
    config = load_fuse_config(None, concepts=[str(p) for p in paths], base="tiny", out=str(tmp_path / name),
                              method=method, **fields)
    return fuse(config, components=tiny_components(), progress=False)


def sample(pipe, words, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(f"photo of a {' '.join(words)}", num_inference_steps=20, seed=0, output_type="latent",
                **kwargs).images


def own_model(path):
    pipe = MixOfShowPipeline(**tiny_components())
    pipe.load_concept(path)
    return pipe


def test_one_concept_fusion_is_that_concepts_model(tmp_path, concepts):
    fused = MixOfShowPipeline.from_base(run_fusion(tmp_path, concepts[:1]))
    torch.testing.assert_close(sample(fused, WORDS[0]), sample(own_model(concepts[0]), WORDS[0]),
                               rtol=1e-4, atol=1e-4)


def test_one_concept_fused_at_a_scale_is_its_model_at_that_scale(tmp_path, concepts):
    """A concept's `unet_scale` / `text_encoder_scale` (official `unet_alpha`) enter the fusion as its strength."""
    spec = {"path": str(concepts[0]), "unet_scale": 1.5, "text_encoder_scale": 1.5}
    config = load_fuse_config(None, concepts=[spec], base="tiny", out=str(tmp_path / "fused"), method="gradient")
    fused = MixOfShowPipeline.from_base(fuse(config, components=tiny_components(), progress=False))
    stronger = MixOfShowPipeline(**tiny_components())
    stronger.load_concept(concepts[0], scale=1.5)
    torch.testing.assert_close(sample(fused, WORDS[0]), sample(stronger, WORDS[0]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sample(fused, WORDS[0]), sample(own_model(concepts[0]), WORDS[0]), atol=1e-3)


def test_gradient_fusion_keeps_each_concept_closer_than_weight_fusion(tmp_path, concepts):
    gradient = MixOfShowPipeline.from_base(run_fusion(tmp_path, concepts, "gradient", "gradient"))
    weight = MixOfShowPipeline.from_base(run_fusion(tmp_path, concepts, "weight", "weight"))
    for path, words in zip(concepts, WORDS):
        reference = sample(own_model(path), words)
        by_gradient = (sample(gradient, words) - reference).abs().mean()
        by_weight = (sample(weight, words) - reference).abs().mean()
        assert by_gradient < by_weight, f"{words}: gradient {by_gradient:.4f} vs weight {by_weight:.4f}"


@pytest.mark.parametrize("method", ["gradient", "zip", "lbfgs"])
def test_every_layer_objective_is_never_worse_than_the_base(tmp_path, concepts, method):
    out = run_fusion(tmp_path, concepts, method, zip_steps=10, lbfgs_text_iterations=20, lbfgs_unet_iterations=5)
    report = json.loads((out / "fusion_report.json").read_text())
    rows = [row for part in report["layers"].values() for row in part.values()]
    assert len(rows) == 8 + 56  # text-encoder and UNet attention linears of the tiny model
    start = "objective_sum" if method == "zip" else "objective_base"  # zip starts from the plain sum of LoRAs
    for row in rows:
        assert row["objective_fused"] <= row[start] * (1 + 1e-9) + 1e-9
        if method == "gradient":
            assert row["objective_fused"] <= row["objective_weight_fusion"] * (1 + 1e-9) + 1e-9


def test_a_concept_with_lora_on_fewer_layers_fuses(tmp_path, concepts):
    # `unet_lora_layers: cross_attention` files hold no self-attention LoRA: exact alone, a zero delta beside others
    full = load_concept(concepts[0])
    cross = dataclasses.replace(full, unet_lora={path: ab for path, ab in full.unet_lora.items()
                                                 if re.search(r"attn2\.(to_k|to_v|to_out\.0)$", path)})
    path = save_concept(cross, tmp_path / "cross.safetensors")
    alone = MixOfShowPipeline.from_base(run_fusion(tmp_path, [path], name="alone"))
    torch.testing.assert_close(sample(alone, WORDS[0]), sample(own_model(path), WORDS[0]), rtol=1e-4, atol=1e-4)
    report = json.loads((run_fusion(tmp_path, [path, concepts[1]], name="mixed") / "fusion_report.json").read_text())
    rows = [row for part in report["layers"].values() for row in part.values()]
    assert len(rows) == 8 + 56
    assert all(row["objective_fused"] <= row["objective_base"] * (1 + 1e-9) + 1e-9 for row in rows)


def test_a_concept_with_feed_forward_lora_fuses(tmp_path, concepts):
    # `unet_lora_layers: attention_ff` files add the feed-forward linears: exact alone, solved beside others
    with_ff = random_concept(tiny_components(), ("<f1>", "<f2>"), seed=5, unet_lora_layers="attention_ff")
    path = save_concept(with_ff, tmp_path / "ff.safetensors")
    alone = MixOfShowPipeline.from_base(run_fusion(tmp_path, [path], name="alone"))
    torch.testing.assert_close(sample(alone, ("<f1>", "<f2>")), sample(own_model(path), ("<f1>", "<f2>")),
                               rtol=1e-4, atol=1e-4)
    report = json.loads((run_fusion(tmp_path, [path, concepts[1]], name="mixed") / "fusion_report.json").read_text())
    rows = {layer: row for part in report["layers"].values() for layer, row in part.items()}
    blocks = {layer.rsplit(".attn", 1)[0] for layer in rows if ".attn" in layer}
    feed_forward = sorted(f"{block}.ff.net.{name}" for block in blocks for name in ("0.proj", "2"))
    assert sorted(rows) == sorted([layer for layer in rows if ".ff.net." not in layer] + feed_forward)
    assert len(rows) == 8 + 56 + len(feed_forward)
    assert all(row["objective_fused"] <= row["objective_base"] * (1 + 1e-9) + 1e-9 for row in rows.values())


@pytest.mark.parametrize("subject_map", ["linear", "mask"])
def test_background_weighted_statistics_fuse_exactly_alone_and_change_a_shared_fusion(tmp_path, concepts,
                                                                                       subject_map):
    # rows weighted by where the concept words are attended: one concept is still exactly its model; two concepts
    # get another least-squares compromise, never worse than the base on its own (weighted) objective
    alone = MixOfShowPipeline.from_base(run_fusion(tmp_path, concepts[:1], name="alone", background_weight=0.1,
                                                      subject_map=subject_map))
    torch.testing.assert_close(sample(alone, WORDS[0]), sample(own_model(concepts[0]), WORDS[0]),
                               rtol=1e-4, atol=1e-4)
    plain = run_fusion(tmp_path, concepts[:2], name="plain")
    weighted = run_fusion(tmp_path, concepts[:2], name="weighted", background_weight=0.1, subject_map=subject_map)
    rows = [row for part in json.loads((weighted / "fusion_report.json").read_text())["layers"].values()
            for row in part.values()]
    assert all(row["objective_fused"] <= row["objective_base"] * (1 + 1e-9) + 1e-9 for row in rows)
    spatial = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    text = "encoder.layers.0.self_attn.q_proj.weight"
    def weights(folder, part):
        return load_file(next((folder / part).glob("*.safetensors")))

    assert not torch.allclose(weights(plain, "unet")[spatial], weights(weighted, "unet")[spatial])
    # the text side has no positions to weight
    torch.testing.assert_close(weights(plain, "text_encoder")[text], weights(weighted, "text_encoder")[text])


@pytest.mark.parametrize("field, value", [("background_weight", 0.0), ("background_weight", 1.5),
                                          ("background_weight", float("nan")), ("subject_map", "disk")])
def test_row_weights_outside_their_choices_are_refused(tmp_path, concepts, field, value):
    with pytest.raises(MixOfShowError, match=field):
        load_fuse_config(None, concepts=[str(concepts[0])], base="tiny", out=str(tmp_path / "o"), **{field: value})


def test_fused_folder_loads_in_diffusers_and_knows_its_concepts(tmp_path, concepts):
    out = run_fusion(tmp_path, concepts[:2])
    plain = StableDiffusionPipeline.from_pretrained(out)
    assert plain.safety_checker is None and "<a1_0>" in plain.tokenizer.get_vocab()
    ours = MixOfShowPipeline.from_base(out)
    assert set(ours.concepts.words()) == {"<a1>", "<a2>", "<b1>", "<b2>"}
    manifest = json.loads((out / "concepts.json").read_text())
    assert manifest["tokens"]["<b2>"] == [f"<b2_{k}>" for k in range(7)]


def test_client_statistics_give_the_same_fused_weights(tmp_path, concepts):
    stats = [compute_statistics(load_fuse_config(None, concepts=[str(p)], base="tiny", out="unused"),
                                tmp_path / f"s{i}.safetensors", components=tiny_components())
             for i, p in enumerate(concepts[:2])]
    at_center = run_fusion(tmp_path, concepts[:2], name="center")
    config = load_fuse_config(None, concepts=[{"path": str(p), "stats": str(s)} for p, s in zip(concepts, stats)],
                              base="tiny", out=str(tmp_path / "clients"))
    from_clients = fuse(config, components=tiny_components(), progress=False)
    for part in ("unet", "text_encoder"):
        expected = load_file(next((at_center / part).glob("*.safetensors")))
        for key, tensor in load_file(next((from_clients / part).glob("*.safetensors"))).items():
            torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6)


def test_statistics_for_another_scale_are_refused(tmp_path, concepts):
    stats = compute_statistics(load_fuse_config(None, concepts=[str(concepts[0])], base="tiny", out="unused"),
                               tmp_path / "s.safetensors", components=tiny_components())
    config = load_fuse_config(None, concepts=[{"path": str(concepts[0]), "stats": str(stats), "unet_scale": 0.5}],
                              base="tiny", out=str(tmp_path / "x"))
    with pytest.raises(MixOfShowError, match="unet_scale"):
        fuse(config, components=tiny_components(), progress=False)


@pytest.mark.parametrize("recorded, used, message", [({"background_weight": 0.5}, {}, "background_weight 0.5"),
                                                     ({"background_weight": 0.5, "subject_map": "mask"},
                                                      {"background_weight": 0.5}, "subject_map mask")])
def test_statistics_with_other_row_weights_are_refused(tmp_path, concepts, recorded, used, message):
    stats = compute_statistics(load_fuse_config(None, concepts=[str(concepts[0])], base="tiny", out="unused",
                                                **recorded),
                               tmp_path / "s.safetensors", components=tiny_components())
    config = load_fuse_config(None, concepts=[{"path": str(concepts[0]), "stats": str(stats)}], base="tiny",
                              out=str(tmp_path / "x"), **used)
    with pytest.raises(MixOfShowError, match=message):
        fuse(config, components=tiny_components(), progress=False)
    assert not (tmp_path / "x").exists()


def test_subject_map_of_unweighted_statistics_does_not_matter(tmp_path, concepts):
    # at background_weight 1 every row counts alike whatever the map: such statistics serve either map
    stats = compute_statistics(load_fuse_config(None, concepts=[str(concepts[0])], base="tiny", out="unused",
                                                subject_map="mask"),
                               tmp_path / "s.safetensors", components=tiny_components())
    config = load_fuse_config(None, concepts=[{"path": str(concepts[0]), "stats": str(stats)}], base="tiny",
                              out=str(tmp_path / "x"))
    assert (fuse(config, components=tiny_components(), progress=False) / "model_index.json").is_file()


def test_colliding_words_are_renamed(tmp_path, concepts, caplog):
    twin = save_concept(random_concept(tiny_components(), WORDS[0], seed=7), tmp_path / "twin.safetensors")
    with caplog.at_level(logging.WARNING):
        out = run_fusion(tmp_path, [concepts[0], twin])
    assert "renamed to <a1~2>" in caplog.text
    fused = MixOfShowPipeline.from_base(out)
    assert {"<a1>", "<a2>", "<a1~2>", "<a2~2>"} == set(fused.concepts.words())
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["inputs"][1]["renamed"] == {"<a1>": "<a1~2>", "<a2>": "<a2~2>"}
    assert torch.isfinite(sample(fused, ("<a1~2>", "<a2~2>"))).all()


# -- bad input: a clear error before any work, nothing written ---------------------------------------------------

def test_concept_from_another_base_model_is_refused(tmp_path, concepts):
    other = save_concept(random_concept(tiny_components(seed=1), ("<z1>",)), tmp_path / "other.safetensors")
    with pytest.raises(MixOfShowError, match="other weights"):
        run_fusion(tmp_path, [concepts[0], other])
    assert not (tmp_path / "fused").exists()


@pytest.mark.parametrize(
    "entries, message",
    [
        ([], "no concepts"),
        (["missing.safetensors"], "not found"),
        ([{"path": "CONCEPT", "unet_scale": float("inf")}], "finite"),
        ([{"path": "CONCEPT", "text_encoder_scale": "big"}], "finite"),
    ],
)
def test_bad_fusion_inputs(tmp_path, concepts, entries, message):
    entries = [str(concepts[0]) if e == "CONCEPT" else e for e in entries]
    entries = [{**e, "path": str(concepts[0])} if isinstance(e, dict) else e for e in entries]
    with pytest.raises(MixOfShowError, match=message):
        fuse(load_fuse_config(None, concepts=entries, base="tiny", out=str(tmp_path / "o")),
             components=tiny_components(), progress=False)
    assert not (tmp_path / "o").exists()


def test_a_file_that_is_not_a_concept_is_refused(tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MixOfShowError, match="not a readable safetensors"):
        run_fusion(tmp_path, [fake])


def test_existing_output_is_kept_unless_overwrite(tmp_path, concepts):
    out = tmp_path / "fused"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MixOfShowError, match="not empty"):
        run_fusion(tmp_path, concepts[:1])
    assert (out / "keep.txt").read_text() == "mine"
    run_fusion(tmp_path, concepts[:1], overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()


def test_official_fusion_list_is_read(tmp_path, concepts):
    listing = tmp_path / "official.json"
    listing.write_text(json.dumps([{"lora_path": str(concepts[0]), "unet_alpha": 0.8, "text_encoder_alpha": 0.6,
                                    "concept_name": "<a1> <a2>"}]))
    config = load_fuse_config(listing, base="tiny", out=str(tmp_path / "o"))
    assert (config.concepts[0].unet_scale, config.concepts[0].text_encoder_scale) == (0.8, 0.6)


# -- the command line -------------------------------------------------------------------------------------------

def test_cli_stats_fuse_and_sample(tmp_path, concepts):
    base = save_tiny_base(tmp_path / "base")
    stats = tmp_path / "a.stats.safetensors"
    assert main(["--quiet", "stats", "--base", str(base), "--concept", str(concepts[0]), "--sampling-steps", "4",
                 "--out", str(stats), "--device", "cpu"]) == 0
    out = tmp_path / "fused"
    assert main(["--quiet", "fuse", "--base", str(base), "--concept", str(concepts[0]), "--concept", str(concepts[1]),
                 "--sampling-steps", "4", "--method", "gradient", "--out", str(out), "--device", "cpu"]) == 0
    image = tmp_path / "a.png"
    assert main(["--quiet", "sample", "--model", str(out), "--prompt", "photo of a <a1> <a2>", "--steps", "2",
                 "--out", str(image), "--device", "cpu"]) == 0
    assert image.is_file()


def _fuse_in_process(rank, world, port, paths, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fuse(load_fuse_config(None, concepts=paths, base="tiny", out=out, sampling_steps=4),
             components=tiny_components(), progress=False)
    finally:
        dist.destroy_process_group()


def test_two_processes_split_the_concepts_and_give_the_same_model(tmp_path, concepts):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    paths = [str(p) for p in concepts]
    mp.spawn(_fuse_in_process, args=(2, port, paths, str(tmp_path / "two")), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes: float32 sums then agree bit for bit
    try:
        one = fuse(load_fuse_config(None, concepts=paths, base="tiny", out=str(tmp_path / "one"), sampling_steps=4),
                   components=tiny_components(), progress=False)
    finally:
        torch.set_num_threads(threads)
    # The statistics are sums over the concepts in another order: every layer's objective must agree.
    reports = [json.loads((folder / "fusion_report.json").read_text()) for folder in (one, tmp_path / "two")]
    for part, rows in reports[0]["layers"].items():
        for path, row in rows.items():
            other = reports[1]["layers"][part][path]
            assert other["objective_fused"] == pytest.approx(row["objective_fused"], rel=1e-6, abs=1e-9), path
    samples = [sample(MixOfShowPipeline.from_base(folder), WORDS[1]) for folder in (one, tmp_path / "two")]
    torch.testing.assert_close(samples[1], samples[0], rtol=1e-4, atol=1e-4)
