"""The config's FLOP count agrees with what XLA compiles."""

import dataclasses

import jax
import pytest
from flax import nnx

from experiments.lm_step import lm_loss
from models import Transformer, TransformerConfig
from scaling.flops import train_flops_per_token


@pytest.mark.parametrize("cfg", [
    TransformerConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, mlp_dim=384, attn_block=None),
    TransformerConfig(vocab_size=256, d_model=128, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=32, mlp_dim=256,
                      tie_embeddings=True),
])
def test_train_flops_match_cost_analysis(cfg):
    B, T = 2, 128
    # XLA's cost analysis counts a while-loop body once, so count the unrolled stack.
    cfg = dataclasses.replace(cfg, scan_layers=False)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tok = jax.ShapeDtypeStruct((B, T), jax.numpy.int32)
    step = jax.jit(jax.value_and_grad(lambda s, t: lm_loss(graphdef, s, {"inputs": t, "targets": t})))
    compiled = step.lower(state, tok).compile()
    xla = compiled.cost_analysis()["flops"]
    # Count what the kernel executes: every score for the dense masked kernel (attn_block=None), the
    # blocks on and below the diagonal for the block-causal one; the remainder is elementwise work
    # (norms, softmax, SiLU, loss), a few percent at these sizes.
    ours = train_flops_per_token(cfg, T, kernel="executed") * B * T
    assert ours <= xla <= 1.05 * ours, (xla / ours)
    if cfg.attn_block is None:
        assert ours == cfg.flops_per_token(T, causal=False) * B * T
    assert cfg.flops_per_token(T, causal=True) * B * T < ours <= cfg.flops_per_token(T, causal=False) * B * T
    # inference: the forward alone (a factor of the training count that no test read passed)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tok).compile().cost_analysis()["flops"]
    if cfg.attn_block is None:
        dense = cfg.flops_per_token(T, causal=False, training=False) * B * T
        assert dense <= fwd <= 1.05 * dense, fwd / dense


def test_a_dict_config_is_refused_by_name():
    """A config as a dict (a saved run's JSON) was read by attribute: "config has no 'vocab_size'" of a dict that
    holds one. Now the error names the dict and the fix; the same sizes as attributes count as before."""
    from types import SimpleNamespace

    from scaling import param_counts, train_flops_per_token

    d = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match=r"^the config is a dict; scaling.flops reads a config's attributes"):
        param_counts(d)
    with pytest.raises(ValueError, match=r"^the config is a dict"):
        train_flops_per_token(d, 16)
    assert param_counts(SimpleNamespace(**d)) == param_counts(TransformerConfig(**d))

    class AttrDict(dict):  # a mapping whose keys read as attributes too (OmegaConf's DictConfig): taken as before
        def __getattr__(self, name):
            if name not in self:
                raise AttributeError(name)
            return self[name]

    assert param_counts(AttrDict(d)) == param_counts(TransformerConfig(**d))
