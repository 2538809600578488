"""The seed's augmentation (Keras ImageDataGenerator shift + flip) as array ops, jit-able.

A real-valued translation with bilinear sampling and edge-replicating ('nearest') fill is
separable: out = R @ image @ C^T per channel, where R (H x H) and C (W x W) each hold two
non-zero weights per row. A left-right flip is C with its rows reversed. Two small batched
matmuls, exact for integer shifts, identity for a zero shift.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resnet_jax.errors import UserError


def shift_matrix(shift: jax.Array, size: int) -> jax.Array:
    """(size, size) matrix M with (M @ v)[r] = v(r + shift), bilinear, edges replicated."""
    lo = jnp.floor(shift)
    frac = shift - lo
    rows = jnp.arange(size, dtype=jnp.float32) + lo
    i0 = jnp.clip(rows, 0, size - 1).astype(jnp.int32)
    i1 = jnp.clip(rows + 1, 0, size - 1).astype(jnp.int32)
    return (1 - frac) * jax.nn.one_hot(i0, size, dtype=jnp.float32) + frac * jax.nn.one_hot(
        i1, size, dtype=jnp.float32
    )


def transform(images: jax.Array, row_shift, col_shift, flip) -> jax.Array:
    """out[b, r, c] = images[b](r + row_shift[b], c' + col_shift[b]), c' = W-1-c where flip[b]."""
    _, height, width, _ = images.shape
    rows = jax.vmap(shift_matrix, (0, None))(row_shift.astype(jnp.float32), height)
    cols = jax.vmap(shift_matrix, (0, None))(col_shift.astype(jnp.float32), width)
    cols = jnp.where(flip[:, None, None], cols[:, ::-1, :], cols)
    out = jnp.einsum("bri,bijc->brjc", rows, images.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bcj,brjk->brck", cols, out, precision=jax.lax.Precision.HIGHEST)


def augment(key: jax.Array, images: jax.Array, config) -> jax.Array:
    """The seed augmentation of a float NHWC batch (already mean-subtracted).

    Per image: row shift ~ U(-s, s) * H and column shift ~ U(-s, s) * W with s =
    config.shift_range, bilinear, nearest fill; then a left-right flip with p = 0.5 if config.flip.
    Integer images (uint8 pixels) are refused: the bilinear shift makes fractional values, and the
    seed augments the preprocessed floats (x / 255 - mean), which is what the pipeline passes.
    """
    if images.ndim != 4:
        raise UserError(f"augment takes a batch of NHWC images, got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise UserError(
            f"augment takes float images (preprocessed: x / 255 - mean), got {images.dtype}; "
            "convert first, e.g. images.astype(np.float32) / 255"
        )
    n, height, width, _ = images.shape
    k_row, k_col, k_flip = jax.random.split(key, 3)
    s = config.shift_range
    row = jax.random.uniform(k_row, (n,), minval=-s * height, maxval=s * height)
    col = jax.random.uniform(k_col, (n,), minval=-s * width, maxval=s * width)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,)) if config.flip else jnp.zeros((n,), bool)
    return transform(images, row, col, flip)
