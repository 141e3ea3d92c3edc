"""Fused kernels for ddm_hpc (one op per file) and their pure-torch references."""
from kernels.matching_loss import MatchingLossFunction, matching_loss
from kernels.reference import matching_loss_reference

__all__ = ["MatchingLossFunction", "matching_loss", "matching_loss_reference"]
