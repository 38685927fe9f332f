"""Shared test fixtures. The reference data lives in ../shared/fixtures (read-only, tests only)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
OFA_FIXTURES = REPO.parent / "shared" / "fixtures" / "ofa_reference"
DERIVED_SUFFIXES = (".version", "_rp_bucket", "image_position_idx")


@pytest.fixture(scope="session")
def ofa_fixtures() -> Path:
    if not OFA_FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {OFA_FIXTURES}")
    return OFA_FIXTURES


@pytest.fixture(scope="session")
def official_vocab(ofa_fixtures: Path):
    """The official OFA vocabulary (BPE files of the reference fixture)."""
    from ofa_lightning.vocab import UnifiedVocab

    bpe = ofa_fixtures / "bpe"
    if not bpe.is_dir():
        pytest.skip(f"OFA BPE files not found at {bpe}")
    return UnifiedVocab.from_bpe_dir(bpe)


@pytest.fixture(scope="session")
def reference_inputs(ofa_fixtures: Path) -> dict:
    return torch.load(ofa_fixtures / "inputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def reference_outputs(ofa_fixtures: Path) -> dict:
    return torch.load(ofa_fixtures / "outputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def reference_state_dict(ofa_fixtures: Path) -> dict[str, torch.Tensor]:
    return torch.load(ofa_fixtures / "ofa_tiny_random.pt", weights_only=True)


@pytest.fixture(scope="session")
def reference_model(ofa_fixtures: Path, reference_state_dict):
    """The fixture's shrunk ofa_tiny, built from its official args and loaded strictly."""
    from ofa_lightning.config import OFAConfig
    from ofa_lightning.model import OFAModel

    torch.set_num_threads(2)
    args = json.loads((ofa_fixtures / "config.json").read_text())["all_args"]
    model = OFAModel(OFAConfig.from_official_args(argparse.Namespace(**args)))
    weights = {k: v for k, v in reference_state_dict.items() if not k.endswith(DERIVED_SUFFIXES)}
    model.load_state_dict(weights, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def model(vocab):
    """A random nano model over the test module's ``vocab`` fixture. Its bos and unk embedding
    rows are zeroed, so (with the tied output projection) their logits are exactly 0: the
    official ``constraint_range`` keeps ids 0-3 allowed, and a random model would otherwise
    sometimes pick them."""
    from ofa_lightning.config import OFAConfig
    from ofa_lightning.model import OFAModel

    torch.manual_seed(0)
    net = OFAModel(OFAConfig.from_name("nano", vocab_size=len(vocab))).eval()
    with torch.no_grad():
        net.decoder.output_projection.weight[[vocab.bos, vocab.unk]] = 0.0
    return net
