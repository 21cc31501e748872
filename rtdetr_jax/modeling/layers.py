"""Small building blocks shared by the backbone, encoder and decoder (NHWC layout throughout).

Parameter names mirror the transformers checkpoint: batch norm holds `weight`/`bias` in `params` and
`running_mean`/`running_var` in `batch_stats`; convolutions and linears use flax's `kernel`/`bias`. Module names
mirror the PyTorch module tree, with `name_3` standing for the PyTorch list entry `name.3`. The converter relies on
this: it is a mechanical rename plus transposes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rtdetr_jax.ops import activations as ops_activations
from rtdetr_jax.ops.batch_norm import batch_norm_train
from rtdetr_jax.ops.conv import conv2d

Dtype = Any


def precise_dtype(dtype: Dtype):
    """The dtype for numerically sensitive math (softmax, box coordinates): float32, or float64 under x64."""
    return jnp.promote_types(dtype, jnp.float32)


def activation(name: str | None):
    """transformers' ACT2FN names -> jax functions (`gelu` is the exact erf form, as in PyTorch); ReLU and SiLU
    are ops/activations.py's, which keep one array each for the backward pass."""
    if name is None or name == "identity":
        return lambda x: x
    table = {
        "relu": ops_activations.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": ops_activations.silu,
        "swish": ops_activations.silu,
        "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid,
    }
    return table[name]


class Conv2d(nn.Module):
    """PyTorch-style Conv2d on NHWC input: symmetric explicit padding, kernel (kh, kw, in, out)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None  # None: (k - 1) // 2
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = (self.kernel_size - 1) // 2 if self.padding is None else self.padding
        kernel = self.param(
            "kernel",
            nn.initializers.kaiming_normal(),
            (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
            jnp.float32,
        )
        # the algorithm (direct, per-stride-phase gradient, Winograd) is chosen by ops/conv.py
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class BatchNorm(nn.Module):
    """Batch norm over the last axis; `weight`/`bias` in `params`, `running_mean`/`running_var` in `batch_stats`.

    Inference form `y = (x - mean) * weight / sqrt(var + eps) + bias` with the running statistics, unless
    `batch_stats` is mutable (training: `apply(..., mutable=["batch_stats"])`): then it normalises with the batch's
    statistics (biased variance, computed over the whole global batch, so data-parallel training behaves like one
    device) and updates the running ones as PyTorch does (momentum 0.1, unbiased variance).
    `frozen=True` (the backbone's `RTDetrV2FrozenBatchNorm2d`) always uses the running statistics.
    """

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    frozen: bool = False
    momentum: float = 0.1

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "running_var", jnp.ones, (c,), jnp.float32)
        if self.frozen:
            # PyTorch keeps these as buffers: no gradient. Stopping it here also spares the backward pass two
            # reductions over (batch, H, W) per frozen norm (r18vd batch 4 at 640: ~0.4 s of a 10 s step).
            weight, bias = jax.lax.stop_gradient(weight), jax.lax.stop_gradient(bias)
        training = (
            not self.frozen and self.is_mutable_collection("batch_stats") and not self.is_initializing()
        )
        if training:
            # batch statistics over every axis but the last, sums as matrix-vector products (ops/batch_norm.py)
            y, mean, var = batch_norm_train(x, weight, bias, self.eps)
            n = x.size // c
            running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
            running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var * (n / max(n - 1, 1))
            return y
        scale = weight * jax.lax.rsqrt(running_var.value + self.eps)
        # the mean subtracted first, as PyTorch does: x * scale + (bias - mean * scale) rounds x * scale, which is
        # large where |mean| is large against the spread, and the shift then cancels it; on random tiny-bottleneck
        # weights that form gave 2.1x PyTorch's float32 error on the decoder's hidden states, this one 1.0x
        return (x - running_mean.value.astype(self.dtype)) * scale.astype(self.dtype) + bias.astype(self.dtype)


def fold_conv_norm(variables, eps: float):
    """A conv -> inference batch norm pair (the variables of a module holding `conv` and `norm`) as one kernel and
    shift: conv(x, kernel) + shift == norm(conv(x)). Returns (kernel (kh, kw, in, out), shift (out,)) in float32."""
    params, stats = variables["params"], variables["batch_stats"]["norm"]
    scale = params["norm"]["weight"] * jax.lax.rsqrt(stats["running_var"] + eps)
    return params["conv"]["kernel"] * scale, params["norm"]["bias"] - stats["running_mean"] * scale


def rows_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for a linear layer, (..., in) x (in, out) -> (..., out), with the leading axes flattened
    into one row axis first: the same matmul, but its gradients are then 2-d matmuls too. For the kernel gradient,
    x^T @ dy over every row, XLA:CPU transposes one operand; from (batch, tokens, features) it did so as a 3-d
    permutation, which its loop emitter runs ~3.5x slower than the 2-d transpose of the same data (the decoder's
    `value_proj` over the 4 x 8400 encoder tokens: ~31 ms of thread time per layer in the r18vd batch-4 train
    step). Other dimension numbers go to `lax.dot_general` unchanged."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (lhs.ndim > 2 and rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
            and not lhs_batch and not rhs_batch):
        rows = lhs.reshape(-1, lhs.shape[-1])
        out = jax.lax.dot_general(rows, rhs, (((1,), (0,)), ((), ())), precision=precision,
                                  preferred_element_type=preferred_element_type)
        return out.reshape(*lhs.shape[:-1], rhs.shape[-1])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def dense(features: int, name: str, dtype: Dtype = jnp.float32, use_bias: bool = True) -> nn.Dense:
    """A linear layer named as its PyTorch counterpart; its matmul over flattened rows (`rows_dot_general`)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    dot_general=rows_dot_general)


class LinearParameters(nn.Module):
    """A linear layer's kernel and bias under `nn.Dense`'s names and initialisers, for a caller that applies them
    itself (the deformable attention's `value_proj`, applied inside `projected_deformable_sampling`)."""

    in_features: int
    features: int

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


def layer_norm(name: str, eps: float, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class MLPPredictionHead(nn.Module):
    """`num_layers` linears with ReLU between them (transformers' `RTDetrV2MLPPredictionHead`)."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = dense(self.output_dim if last else self.hidden_dim, f"layers_{i}", self.dtype)(x)
            if not last:
                x = ops_activations.relu(x)
        return x


class MultiheadSelfAttention(nn.Module):
    """Self-attention with position embeddings added to queries and keys, not values (DETR style).

    Args:
      hidden_states: (batch, tokens, dim).
      position_embeddings: (batch or 1, tokens, dim) or None.
      attention_mask: additive mask broadcastable to (batch, heads, tokens, tokens) or None.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, position_embeddings=None, attention_mask=None):
        b, n, d = hidden_states.shape
        head_dim = d // self.num_heads
        qk_input = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        # (batch, tokens, heads, head_dim)
        q = dense(d, "q_proj", self.dtype)(qk_input).reshape(b, n, self.num_heads, head_dim)
        k = dense(d, "k_proj", self.dtype)(qk_input).reshape(b, n, self.num_heads, head_dim)
        v = dense(d, "v_proj", self.dtype)(hidden_states).reshape(b, n, self.num_heads, head_dim)
        # (batch, heads, tokens, tokens)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (head_dim**-0.5), k)
        if attention_mask is not None:
            logits = logits + attention_mask
        weights = ops_activations.softmax(logits.astype(precise_dtype(self.dtype)), -1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
        return dense(d, "out_proj", self.dtype)(out)
