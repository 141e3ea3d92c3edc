"""Fused kernels for ddm_hpc (one op per file) and their pure-torch references."""
from kernels.matching_loss import MatchingLossFunction, matching_loss, triton_usable
from kernels.reference import matching_loss_reference

__all__ = ["MatchingLossFunction", "matching_loss", "matching_loss_reference", "triton_usable"]
