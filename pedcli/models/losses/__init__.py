"""Training objectives, one module per family; import them from here."""

from pedcli.models.losses.identity import IGNORE_LABEL, SharedClassifier, identity_loss
from pedcli.models.losses.part_alignment import part_alignment_loss
from pedcli.models.losses.projection import cmpc_loss, cmpm_loss
from pedcli.models.losses.ranking import sum_of_hinges, triplet_hardest
from pedcli.models.losses.similarity_ranking import similarity_ranking_loss

__all__ = [
    "IGNORE_LABEL",
    "SharedClassifier",
    "cmpc_loss",
    "cmpm_loss",
    "identity_loss",
    "part_alignment_loss",
    "similarity_ranking_loss",
    "sum_of_hinges",
    "triplet_hardest",
]
