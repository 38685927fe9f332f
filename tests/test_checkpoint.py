"""Checkpoint import/export: official fairseq containers, bare and HF state dicts, our format.

Everything is built from the reference fixtures (the official ofa_tiny state dict shrunk, and the
key/shape manifest of the real ofa_tiny); no network, no real weights.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ofa_lightning.checkpoint import (
    CheckpointError,
    FORMAT_NAME,
    TIED_EMBEDDING_KEYS,
    architecture_facts,
    convert,
    drop_derived_entries,
    infer_config,
    is_derived_key,
    load_checkpoint,
    load_state_dict_strict,
    save_checkpoint,
)
from ofa_lightning.config import OFAConfig
from ofa_lightning.model import OFAModel

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ofa_reference"

DERIVED_KEYS = {
    "encoder.version", "decoder.version", "encoder.token_rp_bucket", "decoder.token_rp_bucket",
    "encoder.image_rp_bucket", "decoder.image_rp_bucket", "decoder.image_position_idx",
}

# fairseq -> HF renames exactly as reference/ofa_spec.md §7.4 lists them (substring replace, in
# this order). Written here independently of the product's reverse mapping.
SPEC_HF_RENAMES = [
    ("self_attn_ln", "self_attn_mid_layer_norm"),
    ("ffn_layernorm", "ffn_layer_norm"),
    ("cross_attn_ln", "cross_attn_mid_layer_norm"),
    ("encoder_attn", "cross_attn"),
    ("attn_ln", "self_attn_mid_layer_norm"),
]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def official_sd() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "ofa_tiny_random.pt", weights_only=True, mmap=True)


@pytest.fixture(scope="module")
def reference_config() -> dict:
    return json.loads((FIXTURES / "config.json").read_text())


@pytest.fixture(scope="module")
def official_args(reference_config) -> argparse.Namespace:
    return argparse.Namespace(**reference_config["all_args"])


def _ema_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A distinguishable 'EMA' copy: floats shifted by 0.5, integer buffers kept."""
    shared = state_dict[TIED_EMBEDDING_KEYS[0]] + 0.5
    return {key: shared if key in TIED_EMBEDDING_KEYS
            else (value + 0.5 if value.is_floating_point() else value)
            for key, value in state_dict.items()}


def _fairseq_container(args, state_dict, ema=None) -> dict:
    """The layout of an official trainer checkpoint (reference/ofa_spec.md §7.2)."""
    extra_state = {
        # fairseq meters can hold numpy scalars; the allow-list must accept them
        "metrics": {"default": [("loss", 0, "AverageMeter",
                                 {"val": np.float64(2.5), "sum": np.float32(7.5),
                                  "count": np.int64(3), "round": 3})]},
        "previous_training_time": 12.5,
        "train_iterator": {"epoch": 1, "iterations_in_epoch": 10, "shuffle": True},
    }
    if ema is not None:
        extra_state["ema"] = ema
    return {
        "args": None,
        "cfg": {"common": {"seed": 1, "fp16": False}, "model": args,
                "task": {"_name": "caption", "patch_image_size": 480},
                "ema": {"store_ema": ema is not None}},
        "model": state_dict,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion",
                               "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 10}],
        "task_state": {},
        "extra_state": extra_state,
        "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}},
                                 "param_groups": [{"lr": 1e-4, "params": [0]}]},
    }


def _assert_same_weights(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


# ------------------------------------------------------------------------- config inference
def test_inference_on_fixture_gives_config_json_model_values(official_sd, reference_config):
    config = infer_config(official_sd)
    model = reference_config["model"]
    assert config.encoder_layers == model["encoder_layers"] == 2
    assert config.decoder_layers == model["decoder_layers"]
    assert config.embed_dim == model["encoder_embed_dim"] == model["decoder_embed_dim"]
    assert config.ffn_dim == model["encoder_ffn_embed_dim"] == model["decoder_ffn_embed_dim"]
    assert config.attention_heads == model["encoder_attention_heads"]
    assert config.resnet_type == model["resnet_type"]
    assert config.vocab_size == model["vocab_size"]
    assert config.token_bucket_size == model["token_bucket_size"]
    assert config.image_bucket_size == model["image_bucket_size"]
    assert config.max_positions == model["max_source_positions"] == model["max_target_positions"]
    assert config.code_image_size == model["code_image_size"]
    assert (config.scale_attn, config.scale_fc, config.scale_heads) == (True, True, True)
    # and the whole config equals what the official arguments give
    args = argparse.Namespace(**reference_config["all_args"])
    assert config == OFAConfig.from_official_args(args)


def test_inference_on_real_ofa_tiny_shapes_gives_the_tiny_preset():
    manifest = json.loads((FIXTURES / "ofa_tiny_real_keys.json").read_text())
    assert len(manifest["keys"]) == 543
    assert infer_config(manifest["keys"]) == OFAConfig.from_name("tiny")


def _shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def _with_trunk_blocks(shapes: dict, layer2: int, layer3: int) -> dict:
    """Shapes with the ResNet stages 2 and 3 cut/extended to the given block counts."""
    result = {k: v for k, v in shapes.items()
              if not k.startswith(("encoder.embed_images.layer2.", "encoder.embed_images.layer3."))}
    for stage, blocks in ((2, layer2), (3, layer3)):
        for block in range(blocks):
            result[f"encoder.embed_images.layer{stage}.{block}.conv1.weight"] = (1, 1, 1, 1)
    return result


@pytest.mark.parametrize("layer2, layer3, name",
                         [(4, 6, "resnet50"), (4, 23, "resnet101"), (8, 36, "resnet152")])
def test_resnet_type_from_block_counts(official_sd, layer2, layer3, name):
    shapes = _with_trunk_blocks(_shapes(official_sd), layer2, layer3)
    assert infer_config(shapes).resnet_type == name


def test_unknown_trunk_is_refused_with_its_block_counts(official_sd):
    shapes = _with_trunk_blocks(_shapes(official_sd), 4, 5)
    with pytest.raises(CheckpointError, match=r"\[3, 4, 5\] blocks per stage.*resnet101"):
        infer_config(shapes, source="x.pt")


@pytest.mark.parametrize("length, code_image_size", [(1026, 128), (1025, 128), (1794, 256),
                                                     (1793, 256), (None, 128)])
def test_code_image_size_from_image_position_idx(official_sd, length, code_image_size):
    shapes = _shapes(official_sd)
    del shapes["decoder.image_position_idx"]
    if length is not None:
        shapes["decoder.image_position_idx"] = (length,)
    assert infer_config(shapes).code_image_size == code_image_size


def test_inference_reads_sizes_from_tables_not_defaults(official_sd):
    shapes = _shapes(official_sd)
    for side in ("encoder", "decoder"):
        for layer in range(2):
            shapes[f"{side}.token_rel_pos_table_list.{layer}.weight"] = (2 * 128 - 1, 4)
            shapes[f"{side}.image_rel_pos_table_list.{layer}.weight"] = ((2 * 30 - 1) ** 2 + 3, 4)
        shapes[f"{side}.embed_positions.weight"] = (514, 64)
        for layer in range(2):  # no NormFormer extras at all
            for key in [k for k in shapes if k.startswith(f"{side}.layers.{layer}.")]:
                if any(n in key for n in ("attn_ln", "ffn_layernorm", "c_attn")):
                    del shapes[key]
    config = infer_config(shapes)
    sizes = (config.token_bucket_size, config.image_bucket_size, config.max_positions)
    assert sizes == (128, 30, 512)
    assert (config.scale_attn, config.scale_fc, config.scale_heads) == (False, False, False)
    assert config.attention_heads == 4  # from the relative-position table columns


def test_inference_refuses_encoder_decoder_disagreement(official_sd):
    shapes = _shapes(official_sd)
    shapes["decoder.layers.0.fc1.weight"] = (256, 64)
    shapes["decoder.layers.1.fc1.weight"] = (256, 64)
    expected = r"x\.pt: .*ffn_dim.*encoder_ffn_dim=128.*decoder_ffn_dim=256"
    with pytest.raises(CheckpointError, match=expected):
        infer_config(shapes, source="x.pt")


# ------------------------------------------------------------------------ derived entries
def test_derived_entries_are_dropped(official_sd):
    assert DERIVED_KEYS <= set(official_sd)
    assert {key for key in official_sd if is_derived_key(key)} == DERIVED_KEYS
    assert set(drop_derived_entries(official_sd)) == set(official_sd) - DERIVED_KEYS


# -------------------------------------------------------------------- formats: round trips
def test_bare_official_state_dict(official_sd):
    loaded = load_checkpoint(FIXTURES / "ofa_tiny_random.pt")
    assert loaded.source_format == "state_dict"
    assert loaded.vocab_state is None
    assert loaded.config == infer_config(official_sd)
    _assert_same_weights(loaded.state_dict, drop_derived_entries(official_sd))


def test_fairseq_container_round_trip(tmp_path, official_sd, official_args):
    ema = _ema_copy(official_sd)
    path = tmp_path / "checkpoint_best.pt"
    torch.save(_fairseq_container(official_args, official_sd, ema), path)

    loaded = load_checkpoint(path)
    assert loaded.source_format == "fairseq"
    assert loaded.config == OFAConfig.from_official_args(official_args)
    _assert_same_weights(loaded.state_dict, drop_derived_entries(official_sd))

    averaged = load_checkpoint(path, use_ema=True)
    _assert_same_weights(averaged.state_dict, drop_derived_entries(ema))
    assert averaged.config == loaded.config


def test_ema_fp32_params_replace_the_rounded_ema(tmp_path, official_sd, official_args):
    ema = {k: (v.half() if v.is_floating_point() else v) for k, v in official_sd.items()}
    container = _fairseq_container(official_args, official_sd, ema)
    fc1 = "encoder.layers.0.fc1.weight"
    container["extra_state"]["ema_fp32_params"] = {fc1: official_sd[fc1] + 1.0}
    torch.save(container, tmp_path / "ema.pt")
    loaded = load_checkpoint(tmp_path / "ema.pt", use_ema=True)
    assert torch.equal(loaded.state_dict[fc1], official_sd[fc1] + 1.0)
    assert loaded.state_dict["encoder.layers.0.fc2.weight"].dtype == torch.float16


def test_legacy_container_with_args_namespace(tmp_path, official_sd, official_args):
    container = {"args": official_args, "model": official_sd, "extra_state": {}}
    torch.save(container, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded.source_format == "fairseq"
    assert loaded.config == OFAConfig.from_official_args(official_args)


def test_container_args_contradicting_weights_are_reported(tmp_path, official_sd, official_args):
    args = argparse.Namespace(**{**vars(official_args), "encoder_layers": 6})
    torch.save(_fairseq_container(args, official_sd), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "bad.pt")
    message = str(error.value)
    assert "bad.pt" in message and "encoder_layers: config says 6, weights have 2" in message
    # the message names the way out, and it works
    assert load_checkpoint(tmp_path / "bad.pt", encoder_layers=2).config.encoder_layers == 2


def test_container_refusing_unsupported_official_flags(tmp_path, official_sd, official_args):
    args = argparse.Namespace(**{**vars(official_args), "scale_resids": True})
    torch.save(_fairseq_container(args, official_sd), tmp_path / "resid.pt")
    with pytest.raises(CheckpointError, match=r"resid\.pt: .*scale_resids"):
        load_checkpoint(tmp_path / "resid.pt")


@pytest.mark.parametrize("encoder, disable, expected", [
    (False, True, False),  # every released checkpoint
    (True, False, True),  # entangled in both stacks
    (True, True, "encoder only"),
    (False, False, "decoder only"),
])
def test_official_entangle_flags_map_to_one_switch(official_args, encoder, disable, expected):
    args = argparse.Namespace(**{**vars(official_args), "entangle_position_embedding": encoder,
                                 "disable_entangle": disable})
    if isinstance(expected, bool):
        assert OFAConfig.from_official_args(args).entangle_position_embedding is expected
    else:
        with pytest.raises(ValueError, match=f"in the {expected.split()[0]} only"):
            OFAConfig.from_official_args(args)


def _to_hf_names(state_dict: dict) -> dict:
    renamed = {}
    for key, value in state_dict.items():
        if "version" in key:
            continue
        for old, new in SPEC_HF_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def test_hf_port_round_trip(tmp_path, official_sd):
    hf = _to_hf_names(official_sd)
    assert "decoder.layers.0.cross_attn.q_proj.weight" in hf
    assert "encoder.layers.0.self_attn_mid_layer_norm.weight" in hf
    hf["decoder.image_position_idx"] = hf["decoder.image_position_idx"][:1025]  # HF's 768 tail
    del hf["decoder.output_projection.weight"]  # a tied weight the export may omit
    torch.save(hf, tmp_path / "pytorch_model.bin")

    loaded = load_checkpoint(tmp_path / "pytorch_model.bin")
    assert loaded.source_format == "hf"
    assert loaded.config == infer_config(official_sd)
    _assert_same_weights(loaded.state_dict, drop_derived_entries(official_sd))


def test_hf_safetensors_with_one_copy_of_the_shared_embedding(tmp_path, official_sd):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    hf = {k: v.contiguous() for k, v in _to_hf_names(drop_derived_entries(official_sd)).items()
          if k not in TIED_EMBEDDING_KEYS[1:]}
    safetensors_torch.save_file(hf, str(tmp_path / "model.safetensors"))
    loaded = load_checkpoint(tmp_path / "model.safetensors")
    assert loaded.source_format == "hf"
    _assert_same_weights(loaded.state_dict, drop_derived_entries(official_sd))


def test_untied_embeddings_are_refused(tmp_path, official_sd):
    state = dict(official_sd)
    state["decoder.output_projection.weight"] = official_sd["encoder.embed_tokens.weight"] + 1
    torch.save(state, tmp_path / "untied.pt")
    expected = r"untied\.pt: decoder\.output_projection\.weight differs"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path / "untied.pt")


def test_own_format_round_trip_with_vocab_and_overrides(tmp_path, official_sd):
    config = infer_config(official_sd)
    vocab = {"tokens": ["<s>", "<pad>", "</s>", "<unk>", "a"], "num_bins": 1000,
             "merges": [["a", "b"]], "ids": torch.arange(5)}
    path = save_checkpoint(tmp_path / "sub" / "model.pt", official_sd, config, vocab_state=vocab)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT_NAME and raw["format_version"] == 1
    assert not DERIVED_KEYS & set(raw["state_dict"])

    loaded = load_checkpoint(path)
    assert loaded.source_format == FORMAT_NAME
    assert loaded.config == config
    assert loaded.vocab_state["tokens"] == vocab["tokens"]
    assert torch.equal(loaded.vocab_state["ids"], vocab["ids"])
    _assert_same_weights(loaded.state_dict, drop_derived_entries(official_sd))

    assert load_checkpoint(path, code_image_size=256).config.code_image_size == 256
    with pytest.raises(CheckpointError, match=r"(?s)model\.pt: .*encoder_layers: config says 4, "
                                              r"weights have 2.*Overrides can change settings"):
        load_checkpoint(path, encoder_layers=4)
    with pytest.raises(CheckpointError, match=r"model\.pt: bad override: .*no_such_field"):
        load_checkpoint(path, no_such_field=1)


def test_own_format_stores_the_shared_embedding_once(tmp_path, official_sd):
    path = save_checkpoint(tmp_path / "m.pt", official_sd, infer_config(official_sd))
    state = torch.load(path, weights_only=True)["state_dict"]
    pointers = {state[key].untyped_storage().data_ptr() for key in TIED_EMBEDDING_KEYS}
    assert len(pointers) == 1


def test_own_format_from_a_newer_version_is_refused(tmp_path, official_sd):
    path = save_checkpoint(tmp_path / "m.pt", official_sd, infer_config(official_sd))
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 2
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"m\.pt: .*format_version 2"):
        load_checkpoint(path)


def test_save_refuses_vocab_that_could_not_be_loaded_safely(tmp_path, official_sd):
    expected = r"vocab_state\['bpe'\] is a \w*Path; a checkpoint may hold only"
    with pytest.raises(CheckpointError, match=expected):
        save_checkpoint(tmp_path / "m.pt", official_sd, infer_config(official_sd),
                        vocab_state={"bpe": Path("encoder.json")})
    assert not (tmp_path / "m.pt").exists()


# ----------------------------------------------------------------------------- safety
class _ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload, refused", [
    (_ShellPayload, f"{os.system.__module__}.system"),
    (_EvalPayload, "eval"),
])
@pytest.mark.parametrize("zip_format", [True, False])
def test_crafted_pickle_is_refused_and_not_executed(tmp_path, payload, refused, zip_format):
    marker = tmp_path / "PWNED"
    container = {"cfg": {"model": argparse.Namespace(arch="ofa_tiny")},
                 "model": {"encoder.embed_tokens.weight": torch.zeros(4, 2)},
                 "extra_state": {"metrics": payload(marker)}}
    path = tmp_path / "evil.pt"
    torch.save(container, path, _use_new_zipfile_serialization=zip_format)
    safe_before = torch.serialization.get_safe_globals()
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "refused" in message and refused in message
    assert not marker.exists()
    # the allow-list was only in force while loading
    assert torch.serialization.get_safe_globals() == safe_before


def test_callers_own_safe_globals_survive_a_load(tmp_path):
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        torch.save({"args": argparse.Namespace(a=1), "x": torch.zeros(1)}, tmp_path / "n.pt")
        with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):  # but read
            load_checkpoint(tmp_path / "n.pt")
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


# ------------------------------------------------------------------------------ errors
def test_missing_ema_names_the_keys_present(tmp_path, official_sd, official_args):
    torch.save(_fairseq_container(official_args, official_sd), tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "no_ema.pt", use_ema=True)
    message = str(error.value)
    assert "no_ema.pt" in message and "extra_state['ema']" in message
    assert "'metrics'" in message and "'train_iterator'" in message


def test_ema_requested_from_a_bare_state_dict():
    expected = r"ofa_tiny_random\.pt: use_ema=True.*bare state dict"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(FIXTURES / "ofa_tiny_random.pt", use_ema=True)


@pytest.mark.parametrize("content, expected", [
    ({"foo": 1, "bar": [2]}, r"unrecognised checkpoint layout \(a dict with keys 'foo', 'bar'\)"),
    ([torch.zeros(1)], r"holds a list, not a dict"),
    ({"format": "something-else"}, r"unknown checkpoint format 'something-else'"),
    ({"bert.embeddings.weight": torch.zeros(1)},
     r"no encoder\.\*/decoder\.\* keys.*bert\.embeddings"),
    ({"state_dict": {}, "pytorch-lightning_version": "2.4"}, r"Lightning training checkpoint"),
])
def test_unknown_layouts_are_described(tmp_path, content, expected):
    torch.save(content, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"(?s)odd\.pt: .*" + expected):
        load_checkpoint(tmp_path / "odd.pt")


def test_not_a_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.pt: no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"hf: is a directory.*pytorch_model\.bin"):
        load_checkpoint(tmp_path / "hf")


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"\x80\x02}q\x00."])
def test_not_a_torch_file(tmp_path, content):
    (tmp_path / "junk.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


# ------------------------------------------------- strict loading (model-free toy module)
class _Layer(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)


class _Stack(nn.Module):
    def __init__(self, layers: int, dim: int, ffn: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, dim)
        self.layers = nn.ModuleList(_Layer(dim, ffn) for _ in range(layers))
        self.norm = nn.BatchNorm1d(dim)


class _Toy(nn.Module):
    """Official-style key names (encoder.layers.N.fc1...) without the real model."""

    def __init__(self, layers: int = 2, dim: int = 8, ffn: int = 16):
        super().__init__()
        self.encoder = _Stack(layers, dim, ffn)
        self.decoder = _Stack(layers, dim, ffn)


def test_strict_load_succeeds_and_ignores_derived_entries():
    source = _Toy()
    state = source.state_dict() | {"encoder.version": torch.tensor([3.0]),
                                   "decoder.token_rp_bucket": torch.zeros(4, 4, dtype=torch.long)}
    target = _Toy()
    load_state_dict_strict(target, state, source="toy.pt")
    assert torch.equal(target.encoder.layers[1].fc2.weight, source.encoder.layers[1].fc2.weight)


def test_strict_load_accepts_batchnorm_without_num_batches_tracked():
    """Files saved from FrozenBatchNorm (--freeze-resnet) have no num_batches_tracked."""
    source = _Toy()
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    target = _Toy()
    load_state_dict_strict(target, state, source="frozen_bn.pt")
    assert torch.equal(target.encoder.norm.running_var, source.encoder.norm.running_var)


def test_strict_load_reports_missing_unexpected_and_shapes():
    state = _Toy(layers=2, ffn=32).state_dict()
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        load_state_dict_strict(_Toy(layers=4, ffn=16), state, source="big.pt")
    message = str(error.value)
    assert message.startswith("big.pt: the weights do not fit the model (_Toy).")
    assert "checkpoint has 2 encoder layers, config has 4" in message
    assert "checkpoint has 2 decoder layers, config has 4" in message
    assert "checkpoint has encoder FFN width 32, config has 16" in message
    assert "Missing keys (16):" in message and "encoder.layers.3.fc2.bias" in message
    assert "Unexpected keys (1):\n  encoder.extra.weight" in message
    assert "encoder.layers.0.fc1.weight: expected (16, 8) found (32, 8)" in message


def test_strict_load_report_is_bounded():
    # 2 stacks x (embedding + 50 layers x 4 + BatchNorm 4, its num_batches_tracked excused)
    expected = r"Missing keys \(410\):(\n  \S+){20}\n  \.\.\. and 390 more"
    with pytest.raises(CheckpointError, match=expected):
        load_state_dict_strict(_Toy(layers=50), {}, source="empty.pt")


# ------------------------------------------------------------------ with the real model
def test_official_weights_load_strictly_into_the_model(official_sd):
    model = OFAModel(infer_config(official_sd))
    load_state_dict_strict(model, official_sd, source="ofa_tiny_random.pt")
    state = model.state_dict()
    for key in ("encoder.layers.1.fc1.weight", "decoder.layers.0.encoder_attn.c_attn",
                "encoder.embed_images.layer3.5.bn3.running_var", *TIED_EMBEDDING_KEYS):
        assert torch.equal(state[key], official_sd[key]), key


def test_model_with_another_architecture_is_explained(official_sd):
    model = OFAModel(infer_config(official_sd).replace(encoder_layers=4))
    with pytest.raises(CheckpointError) as error:
        load_state_dict_strict(model, official_sd, source="ofa_tiny_random.pt")
    message = str(error.value)
    assert "checkpoint has 2 encoder layers, config has 4" in message
    # 2 layers x 21 keys, plus the token and image relative-position tables of layers 2 and 3
    assert "Missing keys (46):" in message and "encoder.layers.2.fc1.weight" in message


def test_convert_fairseq_to_own_format(tmp_path, official_sd, official_args):
    src = tmp_path / "caption_best.pt"
    torch.save(_fairseq_container(official_args, official_sd, _ema_copy(official_sd)), src)
    read = convert(src, tmp_path / "converted.pt", use_ema=True, patch_image_size=480)
    assert read.config.patch_image_size == 480

    loaded = load_checkpoint(tmp_path / "converted.pt")
    assert loaded.source_format == FORMAT_NAME
    assert loaded.config == read.config
    _assert_same_weights(loaded.state_dict, drop_derived_entries(_ema_copy(official_sd)))
    load_state_dict_strict(OFAModel(loaded.config), loaded.state_dict)


def test_save_checkpoint_from_a_model(tmp_path, official_sd):
    model = OFAModel(infer_config(official_sd))
    save_checkpoint(tmp_path / "m.pt", model, vocab_state={"size": 59457})
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == model.config and loaded.vocab_state == {"size": 59457}
    assert set(loaded.state_dict) == set(model.state_dict())
    load_state_dict_strict(model, loaded.state_dict)


def test_architecture_facts_match_the_model_state_dict(official_sd):
    """The model's own keys and shapes must read back as its config (names as official)."""
    config = infer_config(official_sd)
    facts = architecture_facts(OFAModel(config).state_dict())
    assert facts["encoder_layers"] == config.encoder_layers
    assert facts["trunk_blocks"] == (3, 4, 6)


def test_convert_command_line(tmp_path, ofa_fixtures):
    """`ofa-lightning convert` writes a file that OFAModel.from_official reads back."""
    import subprocess
    import sys

    from ofa_lightning.model import OFAModel

    destination = tmp_path / "converted.pt"
    done = subprocess.run([sys.executable, "-m", "ofa_lightning.cli", "convert",
                           str(ofa_fixtures / "ofa_tiny_random.pt"), str(destination),
                           "--set", "code_image_size=256"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = OFAModel.from_official(destination)
    assert model.config.code_image_size == 256 and model.config.encoder_layers == 2
    missing = subprocess.run([sys.executable, "-m", "ofa_lightning.cli", "convert",
                              str(tmp_path / "absent.pt"), str(destination)],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "absent.pt" in missing.stderr
