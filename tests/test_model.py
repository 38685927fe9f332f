"""The re-implemented network against the official OFA code's own outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ofa_lightning.config import OFAConfig
from ofa_lightning.model import DecoderCache, OFAModel
from ofa_lightning.model.image_trunk import build_image_trunk
from ofa_lightning.model.positions import (code_position_ids, image_relative_buckets,
                                           token_relative_buckets)

TOL = dict(atol=1e-4, rtol=1e-4)


def time_major(states: list[torch.Tensor]) -> torch.Tensor:
    """Our batch-first per-layer states as the official (layers, T, B, C) stack."""
    return torch.stack(states).transpose(1, 2)


def test_derived_buffers_equal_official(reference_state_dict):
    assert torch.equal(token_relative_buckets(256, 1024), reference_state_dict["encoder.token_rp_bucket"])
    assert torch.equal(image_relative_buckets(42), reference_state_dict["encoder.image_rp_bucket"])
    assert torch.equal(code_position_ids(16, 42), reference_state_dict["decoder.image_position_idx"])


def test_resnet_trunk_matches(reference_model, reference_inputs, reference_outputs):
    """In the official (NCHW) layout the trunk is exact to 1e-4. The model runs it in NHWC for
    speed, which reorders float sums: outputs up to ~190 then differ by float32 rounding only."""
    expected = reference_outputs["case_a"]["resnet_out"]
    images = reference_inputs["patch_images"]
    nchw_trunk = copy.deepcopy(reference_model.encoder.embed_images).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        nchw = nchw_trunk(images)[-1]
        nhwc = reference_model.encoder.embed_images(images.contiguous(memory_format=torch.channels_last))[-1]
    torch.testing.assert_close(nchw, expected, **TOL)
    assert (nhwc - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("case, mask_key", [("case_a", "patch_masks"),
                                            ("case_b_mask_image_1", "patch_masks_case_b")])
def test_image_text_cases_match(reference_model, reference_inputs, reference_outputs, case, mask_key):
    inputs, expected = reference_inputs, reference_outputs[case]
    with torch.no_grad():
        out = reference_model(inputs["src_tokens"], inputs["patch_images"], inputs[mask_key],
                              inputs["prev_output_tokens"], return_states=True)
    encoder = out.encoder_out
    assert torch.equal(encoder.padding_mask, expected["encoder_padding_mask"])
    torch.testing.assert_close(encoder.hidden.transpose(0, 1), expected["encoder_out"], **TOL)
    torch.testing.assert_close(encoder.position_embeddings, expected["encoder_position_embeddings"], **TOL)
    torch.testing.assert_close(time_major(encoder.states), expected["encoder_states"], **TOL)
    torch.testing.assert_close(time_major(out.decoder_states), expected["decoder_inner_states"], **TOL)
    torch.testing.assert_close(out.features, expected["decoder_features"], **TOL)
    torch.testing.assert_close(out.logits, expected["logits"], **TOL)


def test_text_only_source_image_code_decoder_matches(reference_model, reference_inputs, reference_outputs):
    inputs, expected = reference_inputs, reference_outputs["case_c_image_codes"]
    with torch.no_grad():
        out = reference_model(inputs["code_src_tokens"], prev_output_tokens=inputs["code_prev_output_tokens"],
                              code_masks=inputs["code_masks"], return_states=True)
    length = inputs["code_prev_output_tokens"].shape[1]
    assert torch.equal(reference_model.decoder.image_position_idx[:length],
                       expected["decoder_image_position_idx_used"])
    torch.testing.assert_close(out.encoder_out.hidden.transpose(0, 1), expected["encoder_out"], **TOL)
    torch.testing.assert_close(time_major(out.encoder_out.states), expected["encoder_states"], **TOL)
    torch.testing.assert_close(time_major(out.decoder_states), expected["decoder_inner_states"], **TOL)
    torch.testing.assert_close(out.logits, expected["logits"], **TOL)


def incremental_logits(model, prev, encoder_out, code_masks=None):
    cache = DecoderCache()
    steps = [model.decode(prev[:, :t], encoder_out, code_masks, cache) for t in range(1, prev.shape[1] + 1)]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("code_masks", [None, torch.tensor([True, True]), torch.tensor([True, False])])
def test_incremental_decoding_equals_full_recompute(reference_model, reference_inputs, code_masks):
    inputs = reference_inputs
    prev = inputs["prev_output_tokens"][:, :7]  # no padding inside
    with torch.no_grad():
        encoder_out = reference_model.encode(inputs["src_tokens"], inputs["patch_images"], inputs["patch_masks"])
        full = reference_model.decode(prev, encoder_out, code_masks)
        step_by_step = incremental_logits(reference_model, prev, encoder_out, code_masks)
    torch.testing.assert_close(step_by_step, full, **TOL)


def test_mixed_code_and_text_rows_equal_separate_batches(reference_model, reference_inputs):
    inputs, code_masks = reference_inputs, torch.tensor([True, False])
    prev = inputs["prev_output_tokens"]
    with torch.no_grad():
        encoder_out = reference_model.encode(inputs["src_tokens"], inputs["patch_images"], inputs["patch_masks"])
        mixed = reference_model.decode(prev, encoder_out, code_masks)
        rows = [reference_model.decode(prev[i:i + 1], encoder_out.index_select(torch.tensor([i])),
                                       code_masks[i:i + 1]) for i in range(2)]
    torch.testing.assert_close(mixed, torch.cat(rows), **TOL)


def small_model(**overrides) -> OFAModel:
    torch.manual_seed(0)
    config = OFAConfig.from_name("nano", vocab_size=300, **overrides)
    return OFAModel(config).eval()


@pytest.mark.parametrize("side", [384, 480])
def test_larger_image_grids_use_the_2d_position_table(side):
    """A 480 px image at stride 16 is a 30x30 grid: ids r*42 + c + 1, as the official encoder."""
    model = small_model(resnet_type="resnet18", trunk_stride=16)
    images = torch.randn(1, 3, side, side)
    tokens = torch.tensor([[0, 5, 6, 2]])
    with torch.no_grad():
        encoder_out = model.encode(tokens, images, torch.tensor([True]))
    grid = side // 16
    assert encoder_out.hidden.shape == (1, grid * grid + 4, model.config.embed_dim)
    expected_ids = torch.tensor([r * 42 + c + 1 for r in range(grid) for c in range(grid)])
    expected = model.encoder.image_pos_ln(model.encoder.embed_image_positions(expected_ids))
    torch.testing.assert_close(encoder_out.position_embeddings[0, :grid * grid], expected)


def test_long_sequences_use_logarithmic_buckets_consistently():
    """Past 128 tokens the relative buckets turn logarithmic; decoding step by step must still
    agree with the full pass, and padding must not change the real positions' outputs."""
    model = small_model()
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, 300, (2, 200), generator=generator)
    src[:, 0], src[:, -1] = 0, 2
    prev = torch.randint(4, 300, (2, 150), generator=generator)
    prev[:, 0] = 0
    with torch.no_grad():
        encoder_out = model.encode(src)
        full = model.decode(prev, encoder_out)
        step_by_step = incremental_logits(model, prev, encoder_out)
        padded_src = torch.cat([src, torch.ones(2, 30, dtype=torch.long)], dim=1)
        padded = model.decode(prev, model.encode(padded_src))
    assert token_relative_buckets(256, 1024)[199, 0] != 199 + 255  # really in the log range
    torch.testing.assert_close(step_by_step, full, **TOL)
    torch.testing.assert_close(padded, full, **TOL)


def test_presets_have_official_parameter_counts():
    expected_millions = {"tiny": 33.49, "medium": 92.89, "base": 182.24, "large": 472.98, "huge": 929.49}
    for name, millions in expected_millions.items():
        with torch.device("meta"):
            model = OFAModel(OFAConfig.from_name(name))
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(count - millions) / millions < 1e-3, (name, count)


def test_tiny_preset_has_official_key_names_and_shapes(ofa_fixtures):
    manifest = json.loads((ofa_fixtures / "ofa_tiny_real_keys.json").read_text())
    derived = (".version", "_rp_bucket", "image_position_idx")
    official = {k: v["shape"] for k, v in manifest["keys"].items() if not k.endswith(derived)}
    with torch.device("meta"):
        model = OFAModel(OFAConfig.from_name("tiny"))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == manifest["n_parameters_unique"]


def test_meta_built_model_can_be_materialised():
    with torch.device("meta"):
        model = OFAModel(OFAConfig.from_name("nano", vocab_size=300))
    model.to_empty(device="cpu")
    model.rebuild_derived_buffers()
    assert torch.equal(model.decoder.token_rp_bucket, token_relative_buckets(256, 1024))


def test_limits_give_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="more than max_positions=1024"):
        model.encode(torch.zeros(1, 1025, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the 42x42 position table"):
        model.encode(torch.tensor([[0, 2]]), torch.zeros(1, 3, 8 * 43, 8 * 43))
    encoder_out = model.encode(torch.tensor([[0, 2]]))
    too_long = torch.zeros(1, 1 + 16 * 16 + 770, dtype=torch.long)
    with pytest.raises(ValueError, match="more than max_positions|allows at most"):
        model.decode(too_long, encoder_out, torch.tensor([True]))


def test_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="embed_dim=100 is not divisible by attention_heads=3"):
        OFAConfig(embed_dim=100, attention_heads=3)
    with pytest.raises(ValueError, match="unknown OFA preset 'giant'; known presets: tiny"):
        OFAConfig.from_name("giant")
    with pytest.raises(ValueError, match="dropout must lie in"):
        OFAConfig(dropout=1.5)


def test_explicit_attention_path_equals_fused_kernel():
    """The bf16-on-CPU path (two matmuls) computes what SDPA computes."""
    from ofa_lightning.model.attention import OFAAttention

    torch.manual_seed(0)
    attention = OFAAttention(64, 4, 2.0, 0.0, scale_heads=True).eval()
    query, source = torch.randn(3, 5, 64), torch.randn(3, 7, 64)
    bias = torch.randn(3, 4, 5, 7)
    bias[0, :, :, -2:] = float("-inf")
    key, value = attention.project_kv(source)
    fused = attention(query, key, value, bias)
    q = attention.split_heads(attention.q_proj(query))
    explicit = attention._explicit_attention(q, key, value, bias, 0.0)
    explicit = attention.out_proj((explicit * attention.c_attn[None, :, None, None]).transpose(1, 2).reshape(3, 5, 64))
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention(query, key, value, bias)
    torch.testing.assert_close(low.float(), fused, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_trunk_residual_branches_start_at_kaiming_init_as_official(name):
    """The official ResNet leaves zero_init_residual off; timm's default zeroes the last BN of
    every block, which a from-scratch trunk takes hundreds of steps to grow out of."""
    trunk, _ = build_image_trunk(name, 8)
    last_norms = [block.bn3 if hasattr(block, "bn3") else block.bn2
                  for stage in (trunk.layer1, trunk.layer2) for block in stage]
    assert last_norms and all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in last_norms)


def test_trunk_of_another_timm_family_keeps_its_own_init():
    trunk, channels = build_image_trunk("convnext_atto", 8)
    assert trunk(torch.zeros(1, 3, 64, 64))[-1].shape == (1, channels, 8, 8)


def test_init_std_sets_the_scale_of_a_from_scratch_model():
    small = OFAModel(OFAConfig.from_name("nano", vocab_size=300))
    wide = OFAModel(OFAConfig.from_name("nano", vocab_size=300, init_std=0.02))
    assert small.config.init_std == pytest.approx(128 ** -0.5)
    for model in (small, wide):
        std = model.encoder.layers[0].self_attn.q_proj.weight.std().item()
        assert std == pytest.approx(model.config.init_std, rel=0.05)
    with pytest.raises(ValueError, match="init_std"):
        OFAConfig(init_std=0.0)


@pytest.mark.parametrize("entangle, source_text, expected", [
    (False, True, {"patches": False, "source text": False, "decoder text": False}),
    (True, True, {"patches": True, "source text": True, "decoder text": True}),
    (True, False, {"patches": True, "source text": False, "decoder text": True}),  # nano, mini
])
def test_entangled_positions_reach_the_token_embeddings_only_when_asked(entangle, source_text,
                                                                        expected):
    """A blank image gives every interior patch the same trunk features and a repeated token
    the same embedding; only entangled position embeddings tell them apart before attention."""
    model = small_model(entangle_position_embedding=entangle, entangle_source_text=source_text)
    with torch.no_grad():
        patches, _ = model.encoder.embed_image(torch.zeros(1, 3, 64, 64))
        interior = patches[0].unflatten(0, (8, 8))[2:6, 2:6].flatten(0, 1)
        text = model.encoder.embed_text(torch.tensor([[7, 7, 7]]),
                                        model.encoder.embed_positions(torch.arange(3)))[0]
        decoded = model.decoder(torch.tensor([[0, 7, 7, 7]]),
                                model.encode(torch.tensor([[0, 5, 2]]), None, None),
                                return_states=True).states[0][0, 1:]
    rows = {"patches": interior, "source text": text, "decoder text": decoded}
    differ = {name: not torch.allclose(r[0:1].expand_as(r), r, atol=1e-6)
              for name, r in rows.items()}
    assert differ == expected


@pytest.mark.parametrize("code_masks", [None, torch.tensor([True])])
def test_entangled_decoding_step_by_step_equals_full_recompute(code_masks):
    model = small_model(entangle_position_embedding=True)
    tokens, prev = torch.tensor([[0, 5, 6, 2]]), torch.tensor([[0, 9, 8, 7, 300 - 5]])
    with torch.no_grad():
        encoder_out = model.encode(tokens, torch.randn(1, 3, 64, 64), torch.tensor([True]))
        full = model.decode(prev, encoder_out, code_masks)
        torch.testing.assert_close(incremental_logits(model, prev, encoder_out, code_masks), full,
                                   **TOL)
