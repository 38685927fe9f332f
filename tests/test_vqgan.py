"""The image tokenizer against the official GumbelVQ: key names and shapes of the release,
forward-pass parity with the reference fixture (made with taming-transformers' own code), and
loading from the files users have (the released last.ckpt + model.yaml, bare state dicts).

The fixture is ../shared/fixtures/vqgan_reference (see its README for the tolerances used here).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from ofa_lightning.tokenizer import (GumbelVQ, VQGANConfig, check_codebook_matches,
                                     load_image_tokenizer)
from ofa_lightning.tokenizer.loading import infer_config

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "vqgan_reference"
GUMBEL_SEEDS = {"256": 7, "128": 8}  # README "Quantizer behaviour": seed before each encode
STABLE_GAP = 1e-3  # README: codes are exact wherever the top-1/top-2 logit gap exceeds this


@pytest.fixture(scope="module")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"VQGAN reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="module")
def fixture_config(fixtures: Path) -> dict:
    return json.loads((fixtures / "config.json").read_text())


@pytest.fixture(scope="module")
def fixture_weights(fixtures: Path) -> dict[str, torch.Tensor]:
    return torch.load(fixtures / "vqgan_gumbel_f8_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(fixtures: Path) -> tuple[dict, dict]:
    inputs = torch.load(fixtures / "inputs.pt", weights_only=True)
    outputs = torch.load(fixtures / "outputs.pt", weights_only=True)
    return inputs, outputs


@pytest.fixture(scope="module")
def fixture_threads():
    """The fixture was computed with 2 threads (bit-identical outputs then; 1 thread differs
    by ~3e-5, inside the tolerances)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(fixture_config: dict, fixture_weights: dict, fixture_threads) -> GumbelVQ:
    """Built as OFA does: GumbelVQ(**model.yaml params), weights loaded, eval mode."""
    vq = GumbelVQ(VQGANConfig.from_taming_params(fixture_config["model"]["params"]))
    vq.load_state_dict(fixture_weights, strict=True)  # float16 file -> float32 module
    return vq.eval()


@pytest.fixture(scope="module")
def computed(model: GumbelVQ, reference: tuple[dict, dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Everything the parity tests compare, computed once per image size."""
    inputs, outputs = reference
    results = {}
    for size, seed in GUMBEL_SEEDS.items():
        images = inputs[f"images_{size}"]
        with torch.no_grad():
            encoder_out = model.encoder(images)
            h = model.quant_conv(encoder_out)
            logits = model.quantize.proj(h)
            noise = torch.empty_like(logits).exponential_(
                generator=torch.Generator().manual_seed(seed))
            results[size] = {
                "encoder_out": encoder_out, "h": h, "logits": logits,
                "perturbed": logits - noise.log(),  # what the sampled codes are the argmax of
                "codes_argmax": model.encode_codes(images),
                "codes_gumbel": model.encode_codes(
                    images, sample=True, generator=torch.Generator().manual_seed(seed)),
                "decoded_argmax": model.decode_codes(outputs[f"codes_argmax_{size}"]),
                "decoded_gumbel": model.decode_codes(outputs[f"codes_gumbel_{size}"]),
            }
    return results


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


# ============================================================================ architecture
def test_released_architecture_has_the_released_keys_and_shapes(fixtures: Path):
    manifest = json.loads((fixtures / "released_keys.json").read_text())
    config = VQGANConfig.from_taming_params(manifest["config"])
    assert config == VQGANConfig.from_name("vqgan_gumbel_f8") == VQGANConfig()
    with torch.device("meta"):
        released = GumbelVQ(config)
    shapes = {key: list(value.shape) for key, value in released.state_dict().items()}
    assert list(shapes) == list(manifest["keys"])  # same names, same order
    assert shapes == manifest["keys"]
    assert len(shapes) == manifest["num_keys"] == 301
    assert sum(p.numel() for p in released.parameters()) == manifest["num_parameters"] == 68_995_971
    assert released.n_embed == 8192 and released.downsample == 8


def test_fixture_weights_have_our_key_names_in_order(model: GumbelVQ, fixture_weights: dict):
    assert list(model.state_dict()) == list(fixture_weights)
    assert sum(v.numel() for v in fixture_weights.values()) == 5_120_739


# ================================================================================= parity
@pytest.mark.parametrize("size", ["256", "128"])
def test_encoder_and_quantizer_input_match_the_reference(size, computed, reference):
    ours, ref = computed[size], reference[1]
    torch.testing.assert_close(ours["encoder_out"], ref[f"encoder_out_{size}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["h"], ref[f"h_{size}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", ["256", "128"])
def test_code_logits_match_the_reference(size, computed, reference):
    logits, ref = computed[size]["logits"], reference[1]
    torch.testing.assert_close(logits[:, :, :4, :4], ref[f"logits_corner_{size}"],
                               atol=5e-4, rtol=0)
    torch.testing.assert_close(logits.amax(1), ref[f"logits_max_{size}"], atol=5e-4, rtol=0)
    torch.testing.assert_close(top2_gap(logits), ref[f"logits_top2_gap_{size}"], atol=5e-4, rtol=0)
    torch.testing.assert_close(logits.logsumexp(1), ref[f"logits_logsumexp_{size}"],
                               atol=5e-4, rtol=0)


@pytest.mark.parametrize("size", ["256", "128"])
def test_argmax_codes_are_identical_where_stable(size, computed, reference):
    ours, ref = computed[size]["codes_argmax"], reference[1][f"codes_argmax_{size}"]
    stable = reference[1][f"logits_top2_gap_{size}"] > STABLE_GAP
    assert ours.shape == ref.shape and ours.dtype == torch.int64
    assert stable.float().mean() > 0.99
    assert torch.equal(ours[stable], ref[stable])


@pytest.mark.parametrize("size", ["256", "128"])
def test_sampled_codes_reproduce_the_official_encode(size, computed, reference):
    """encode_codes(sample=True, generator) draws the same Gumbel noise as the official
    encode after torch.manual_seed: identical codes wherever the noisy scores are not tied."""
    ours, ref = computed[size]["codes_gumbel"], reference[1][f"codes_gumbel_{size}"]
    stable = top2_gap(computed[size]["perturbed"]) > STABLE_GAP
    assert stable.float().mean() > 0.99
    assert torch.equal(ours[stable], ref[stable])
    # and sampling is not argmax: the fixture's random model agrees on only ~12% of positions
    assert (ours == computed[size]["codes_argmax"]).float().mean() < 0.5


@pytest.mark.parametrize("size", ["256", "128"])
@pytest.mark.parametrize("kind", ["argmax", "gumbel"])
def test_codebook_lookup_is_exact_and_decoding_matches(size, kind, model, computed, reference):
    ref = reference[1]
    codes = ref[f"codes_{kind}_{size}"]
    assert torch.equal(model.codebook_lookup(codes), ref[f"zq_from_codes_{kind}_{size}"])
    decoded = computed[size][f"decoded_{kind}"]
    assert decoded.shape == (codes.shape[0], 3, codes.shape[1] * 8, codes.shape[2] * 8)
    torch.testing.assert_close(decoded, ref[f"decoded_{kind}_{size}"], atol=5e-4, rtol=0)
    assert decoded.abs().max() > 1.0  # not clamped, as the official decode_code


def test_sampling_follows_the_generator(model, reference):
    images = reference[0]["images_128"]
    draw = lambda seed: model.encode_codes(images, sample=True,
                                           generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert torch.equal(model.encode_codes(images), model.encode_codes(images))


# ================================================================================ misuse
def test_image_sizes_the_downsampling_cannot_tile_are_refused(model):
    with pytest.raises(ValueError, match=r"100x96 .*factor 8"):
        model.encode_codes(torch.zeros(1, 3, 100, 96))
    with pytest.raises(ValueError, match=r"4x4 .*factor 8.*at least 8x8"):
        model.encode_codes(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode_codes(torch.zeros(3, 64, 64))


def test_pixels_outside_minus_one_to_one_are_refused(model):
    with pytest.raises(ValueError, match=r"reach 255.*\[-1, 1\]"):
        model.encode_codes(torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(ValueError, match="uint8"):
        model.encode_codes(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_codes_outside_the_codebook_are_refused(model):
    with pytest.raises(ValueError, match=r"\[0, 50265\].*8192 entries.*code_id\(0\)"):
        model.decode_codes(torch.tensor([[[0, 50265]]]))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode_codes(torch.zeros(1, 16, dtype=torch.long))


@pytest.mark.parametrize("changes, message", [
    (dict(embed_dim=128), "embed_dim=128 must equal z_channels=256"),
    (dict(ch=48), r"norm_groups=32 .*widths \[48, 96, 192\]"),
    (dict(double_z=True), "double_z"),
    (dict(attn_resolutions=[40]), r"\[40\] is no level's side length"),
    (dict(ch_mult=[]), "ch_mult"),
])
def test_bad_configs_are_refused_with_the_field_named(changes, message):
    with pytest.raises(ValueError, match=message):
        VQGANConfig(**changes)


def test_presets_by_name():
    assert VQGANConfig.from_name("shapes_f8").downsample == 8
    assert VQGANConfig.from_name("vqgan_gumbel_f8", n_embed=1024).n_embed == 1024
    with pytest.raises(ValueError, match="known presets: vqgan_gumbel_f8, shapes_f8"):
        VQGANConfig.from_name("f16")
    with pytest.raises(ValueError, match="unknown VQGANConfig field.*chanels"):
        VQGANConfig.from_name("shapes_f8", chanels=3)


# =============================================================================== loading
@pytest.fixture
def legacy_checkpoint_class(monkeypatch) -> type:
    """The class pytorch_lightning 1.x pickled as a key of checkpoint["callbacks"]; a stand-in
    under the same name when pytorch_lightning is not installed (only the name is stored)."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    try:
        return importlib.import_module(name).ModelCheckpoint
    except ImportError:
        pass
    for prefix in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.setitem(sys.modules, prefix, types.ModuleType(prefix))
    stand_in = type("ModelCheckpoint", (), {"__module__": name})
    sys.modules[name].ModelCheckpoint = stand_in
    return stand_in


@pytest.fixture
def released_layout(legacy_checkpoint_class):
    def write(directory: Path, weights: dict, params: dict | None) -> Path:
        """What OFA ships: vqgan/last.ckpt from pytorch_lightning 1.0 (callback states keyed
        by the callback class, training-only loss.* weights) and optionally vqgan/model.yaml."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {**weights, "loss.logvar": torch.zeros(())}
        torch.save({"epoch": 10, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
                    "callbacks": {legacy_checkpoint_class: {
                        "monitor": "val/rec_loss", "best_model_score": torch.tensor(0.1)}},
                    "optimizer_states": [], "lr_schedulers": [], "state_dict": state},
                   directory / "last.ckpt")
        if params is not None:
            (directory / "model.yaml").write_text(yaml.safe_dump(
                {"model": {"base_learning_rate": 4.5e-06,
                           "target": "taming.models.vqgan.GumbelVQ", "params": params}}))
        return directory / "last.ckpt"

    return write


def test_released_checkpoint_layout_loads_with_its_model_yaml(tmp_path, released_layout,
                                                              fixture_config,
                                                              fixture_weights, reference):
    params = fixture_config["model"]["params"]
    path = released_layout(tmp_path / "vqgan", fixture_weights, params)
    tokenizer = load_image_tokenizer(path)
    assert tokenizer.config == VQGANConfig.from_taming_params(params)
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    assert all(p.dtype == torch.float32 for p in tokenizer.parameters())
    inputs, outputs = reference
    codes = tokenizer.encode_codes(inputs["images_128"])
    stable = outputs["logits_top2_gap_128"] > STABLE_GAP
    assert torch.equal(codes[stable], outputs["codes_argmax_128"][stable])


def test_without_model_yaml_the_architecture_is_read_off_the_weights(tmp_path, released_layout,
                                                                     fixture_config,
                                                                     fixture_weights):
    expected = VQGANConfig.from_taming_params(fixture_config["model"]["params"])
    assert infer_config(fixture_weights) == expected
    path = released_layout(tmp_path / "vqgan", fixture_weights, params=None)
    assert load_image_tokenizer(path).config == expected
    # a bare state dict (the fixture file itself) works the same way
    assert load_image_tokenizer(FIXTURES / "vqgan_gumbel_f8_small.pt").config == expected


def test_a_model_yaml_that_contradicts_the_weights_is_reported(tmp_path, released_layout,
                                                                fixture_config,
                                                                fixture_weights):
    params = json.loads(json.dumps(fixture_config["model"]["params"]))
    params["n_embed"] = 1024
    path = released_layout(tmp_path / "vqgan", fixture_weights, params)
    with pytest.raises(ValueError, match=r"(?s)model\.yaml.*quantize\.embed\.weight: model "
                                         r"\(1024, 64\), file \(8192, 64\)"):
        load_image_tokenizer(path)


def test_loading_errors_name_the_file_and_what_was_expected(tmp_path, released_layout,
                                                            fixture_config,
                                                            fixture_weights):
    missing = tmp_path / "vqgan" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such image-tokenizer"):
        load_image_tokenizer(missing)
    with pytest.raises(ValueError, match="is a directory"):
        load_image_tokenizer(tmp_path)
    ofa = tmp_path / "ofa.pt"
    torch.save({"model": {"encoder.layers.0.fc1.weight": torch.zeros(2, 2)}}, ofa)
    with pytest.raises(ValueError, match=r"not a GumbelVQ image-tokenizer checkpoint: expected "
                                         r"the keys encoder\.conv_in\.weight.*quantize\.embed"):
        load_image_tokenizer(ofa)
    ofa_fit = tmp_path / "ofa_fit.ckpt"
    torch.save({"state_dict": {"model.encoder.layers.0.fc1.weight": torch.zeros(2, 2)}}, ofa_fit)
    with pytest.raises(ValueError, match="looks like an OFA model checkpoint"):
        load_image_tokenizer(ofa_fit)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_image_tokenizer(garbage)
    params = json.loads(json.dumps(fixture_config["model"]["params"]))
    path = released_layout(tmp_path / "vq", fixture_weights, params)
    (path.parent / "model.yaml").write_text(yaml.safe_dump(
        {"model": {"target": "taming.models.vqgan.VQModel", "params": params}}))
    with pytest.raises(ValueError, match="VQModel; only taming's GumbelVQ"):
        load_image_tokenizer(path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path, fixture_weights):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": fixture_weights, "hook": os.system}, path)
    with pytest.raises(ValueError, match=r"refused to load: .*allow-list \(.*system"):
        load_image_tokenizer(path)


def test_codebook_size_must_match_the_vocabulary(model):
    check_codebook_matches(model, 8192, "data")
    with pytest.raises(ValueError, match=r"data: the image tokenizer has a codebook of 8192 codes, "
                                         r"but the vocabulary has 1024 code tokens.*num_codes "
                                         r"to 8192"):
        check_codebook_matches(model, 1024, "data")
    with pytest.raises(ValueError, match="has no code tokens"):
        check_codebook_matches(model, 0, "data")
