"""ReLU, SiLU and softmax whose gradients keep one array per call for the backward pass, not two or three.

jax differentiates `jax.nn.relu` (a `custom_jvp`), `jax.nn.silu` (x * sigmoid(x)) and `jax.nn.softmax` by
linearising them, and keeps for the backward pass every intermediate that the linearised function reads:
ReLU's comparison mask (a bool array) next to its output, which the next convolution keeps anyway for its kernel
gradient, and a zero-filled array; SiLU's sigmoid next to its input; softmax's unnormalised exponentials next to
its output. In the r18vd batch-4 training step at 640, `jax.ad_checkpoint.print_saved_residuals` counts 2946 MB
held from the forward to the backward pass with jax's functions and 1971 MB with these; ~460 MB of the difference
are the zero-filled arrays, which XLA can fuse away, the rest real arrays (masks, sigmoids, exponentials).
That is jax's count before XLA optimises: XLA's planned scratch for the step (`compiled.memory_analysis()`) is
3054 MB with these and with jax's own, since it fuses and merges much of what jax lists. The speed-up below was
measured on the step itself.

Here each is a `custom_vjp` that keeps one array and recomputes the rest in the backward pass, where XLA fuses it
into the gradient's elementwise work:

- `relu` keeps its output (y > 0 exactly where x > 0, so the mask is recomputed from it);
- `silu` keeps its input (the sigmoid is recomputed);
- `softmax` keeps its output (dx = y * (g - sum(y * g))).

The values are jax's: the same forward computation, and the same gradients up to float rounding (tests/
test_activations.py). The training step ran 0.94x and 0.83x the time with them (two paired A/Bs, in both
compilation orders; benchmarks/README.md). Being `custom_vjp`s, they support reverse-mode differentiation
(`jax.grad`, `jax.vjp`), not forward mode (`jax.jvp` raises), which nothing in the detector uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@jax.custom_vjp
def relu(x):
    """`jax.nn.relu`: max(x, 0), gradient 0 at x <= 0."""
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


@jax.custom_vjp
def silu(x):
    """`jax.nn.silu`: x * sigmoid(x)."""
    return x * jax.nn.sigmoid(x)


def _silu_fwd(x):
    return x * jax.nn.sigmoid(x), x


def _silu_bwd(x, g):
    s = jax.nn.sigmoid(x)
    return (g * (s * (1 + x * (1 - s))),)


silu.defvjp(_silu_fwd, _silu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax(x, axis: int = -1):
    """`jax.nn.softmax(x, axis=axis)` for one static integer axis."""
    return jax.nn.softmax(x, axis=axis)


def _softmax_fwd(x, axis):
    y = jax.nn.softmax(x, axis=axis)
    return y, y


def _softmax_bwd(axis, y, g):
    return (y * (g - jnp.sum(y * g, axis=axis, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)
