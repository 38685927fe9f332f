"""OFA's image tokenizer (taming-transformers' Gumbel VQGAN): images <-> grids of codes.

``GumbelVQ`` is the network, ``load_image_tokenizer`` reads the released checkpoint or one
trained here (``ofa-lightning fit --config configs/tokenizer/shapes_vq.yaml``), and
``check_codebook_matches`` guards the vocabulary's ``<code_i>`` tokens against the codebook.
The training module lives in ``ofa_lightning.tokenizer.training`` (imported on demand: it
pulls in Lightning and torchmetrics, which tokenizing does not need).
"""

from ofa_lightning.tokenizer.loading import check_codebook_matches, load_image_tokenizer
from ofa_lightning.tokenizer.vqgan import GumbelVQ, VQGANConfig

__all__ = ["GumbelVQ", "VQGANConfig", "check_codebook_matches", "load_image_tokenizer"]
