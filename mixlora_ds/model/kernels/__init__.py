"""Fused GPU kernels (Triton) for MixLoRA blocks; optional: everything here needs ``triton``."""
