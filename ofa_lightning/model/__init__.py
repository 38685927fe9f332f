"""The OFA network as plain nn.Modules: no Lightning, no I/O beyond checkpoint loading."""

from ofa_lightning.model.decoder import DecoderCache, DecoderOutput
from ofa_lightning.model.encoder import EncoderOutput
from ofa_lightning.model.ofa import OFAModel, OFAOutput

__all__ = ["DecoderCache", "DecoderOutput", "EncoderOutput", "OFAModel", "OFAOutput"]
