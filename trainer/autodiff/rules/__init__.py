"""Gradient rules by op family, mirroring trainer/kernels/."""
