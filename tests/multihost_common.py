"""Shared by the two-process test and its workers."""

import numpy as np

from models import TransformerConfig

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64)


def global_tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, size=(4, 17)).astype(np.int32)
