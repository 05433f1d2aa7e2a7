"""Helpers shared by the model and decoding tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, xt, t, x0=None, seed=1):
    """Random parameters of the right shapes (with their logical-axis boxes), drawn with numpy: no init compile.

    Unlike the real init, nothing is zero (adaLN-zero and the zero output layer would hide every dependency).
    Leaves get the model's param_dtype (float64 for a float64 network, under jax.enable_x64).
    """
    abstract = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), xt, t, x0=x0)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 1 or "bias" in name:
            value = (1.0 if "scale" in name else 0.0) + 0.3 * rng.standard_normal(leaf.shape)
        else:  # fan-in scaled; the attention output kernel [heads, head_dim, d] has fan-in heads * head_dim
            fan_in = leaf.shape[0] * (leaf.shape[1] if "out_kernel" in name else 1)
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)
