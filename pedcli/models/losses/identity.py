"""Identity (person-id classification) objective shared by the image and text branches."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pedcli.data.schema import IGNORE_LABEL  # label outside the training identities (base.py batch keys)


class SharedClassifier(nn.Module):
    """One linear classifier for both modalities: sharing it pulls image and text features of one
    person towards the same class weight (PMA / MIA / MGEL's identity losses)."""

    def __init__(self, dim: int, num_classes: int, bias: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def identity_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over identities; rows labelled -100 are ignored (zero loss if all are)."""
    if not bool((labels != IGNORE_LABEL).any()):
        return logits.sum() * 0.0  # keeps the graph (and DDP's used-parameter bookkeeping) intact
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL)
