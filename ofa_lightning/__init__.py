"""ofa-lightning: OFA, the unified multimodal seq2seq model, as a Lightning research template."""

from ofa_lightning.config import OFAConfig
from ofa_lightning.model import OFAModel
from ofa_lightning.vocab import UnifiedVocab

__all__ = ["OFAConfig", "OFAModel", "UnifiedVocab"]
__version__ = "0.1.0"
