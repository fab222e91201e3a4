"""DIN-style conversion baseline: no sequence encoder, the conversion head's target attention
runs directly over the node input embeddings (Zhou et al., Deep Interest Network). Conversion only:
its retrieval figures are null in the evaluation."""

from __future__ import annotations

import torch

from tgastream.model.base import SequenceRecommender
from tgastream.model.batching import Batch


class DIN(SequenceRecommender):
    name = "din"
    does_retrieval = False

    def encode_nodes(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        return x  # [B, N, d]: no encoder
