"""The seed augmentation: exact shifts, bilinear half pixels, edge fill, flips, uniform ranges."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax.model.augment import augment, transform


@pytest.fixture
def images():
    return jax.random.normal(jax.random.key(0), (3, 10, 12, 2))


def shifted(img, dr, dc):
    """Reference: out[r, c] = img[clip(r + dr), clip(c + dc)] for integer shifts."""
    h, w = img.shape[:2]
    r = np.clip(np.arange(h) + dr, 0, h - 1)
    c = np.clip(np.arange(w) + dc, 0, w - 1)
    return img[r][:, c]


@pytest.mark.slow
def test_zero_shift_no_flip_is_identity(images):
    z = jnp.zeros(3)
    np.testing.assert_array_equal(transform(images, z, z, jnp.zeros(3, bool)), images)


def test_integer_shift_moves_pixels_and_replicates_edges(images):
    out = np.asarray(
        transform(images, jnp.array([2.0, -3.0, 0.0]), jnp.array([-4.0, 1.0, 5.0]), jnp.zeros(3, bool))
    )
    x = np.asarray(images)
    for b, (dr, dc) in enumerate([(2, -4), (-3, 1), (0, 5)]):
        np.testing.assert_array_equal(out[b], shifted(x[b], dr, dc))
    assert np.all(out[0, -1] == out[0, -3])  # bottom rows replicate the edge row


def test_half_pixel_shift_is_bilinear_average(images):
    x = np.asarray(images)
    out = np.asarray(
        transform(images, jnp.array([0.5, 0, 0.5]), jnp.array([0, 0.5, -0.5]), jnp.zeros(3, bool))
    )
    np.testing.assert_allclose(out[0], (shifted(x[0], 0, 0) + shifted(x[0], 1, 0)) / 2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[1], (shifted(x[1], 0, 0) + shifted(x[1], 0, 1)) / 2, rtol=1e-6, atol=1e-6)
    quad = sum(shifted(x[2], dr, dc) for dr in (0, 1) for dc in (-1, 0)) / 4
    np.testing.assert_allclose(out[2], quad, rtol=1e-6, atol=1e-6)


def test_flip_after_shift(images):
    x = np.asarray(images)
    out = np.asarray(
        transform(images, jnp.array([1.0, 0, 0]), jnp.array([2.0, 0, 0]), jnp.array([True, True, False]))
    )
    np.testing.assert_array_equal(out[0], shifted(x[0], 1, 2)[:, ::-1])
    np.testing.assert_array_equal(out[1], x[1][:, ::-1])
    np.testing.assert_array_equal(out[2], x[2])


@pytest.mark.slow
def test_flips_happen_half_the_time():
    config = rj.Config(shift_range=0.0)
    x = jax.random.normal(jax.random.key(1), (4000, 4, 4, 1))
    out = np.asarray(augment(jax.random.key(2), x, config))
    flipped = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
    kept = np.all(out == np.asarray(x), axis=(1, 2, 3))
    assert np.all(flipped ^ kept)
    assert abs(flipped.mean() - 0.5) < 0.03
    no_flip = np.asarray(augment(jax.random.key(2), x, dataclasses.replace(config, flip=False)))
    np.testing.assert_array_equal(no_flip, x)


@pytest.mark.slow
@pytest.mark.parametrize("axis", [0, 1])
def test_shifts_are_uniform_over_the_range(axis):
    """On a ramp image the centre pixel reads centre + shift, so the shifts can be read back."""
    config = rj.Config(flip=False)  # shift_range 0.1: +-6.4 pixels on 64
    n, size = 4000, 64
    ramp = jnp.broadcast_to(
        jnp.arange(size, dtype=jnp.float32)[:, None]
        if axis == 0
        else jnp.arange(size, dtype=jnp.float32)[None, :],
        (size, size),
    )
    x = jnp.broadcast_to(ramp[None, :, :, None], (n, size, size, 1))
    out = np.asarray(augment(jax.random.key(3), x, config))
    shifts = out[:, 32, 32, 0] - 32
    assert shifts.min() >= -6.4 and shifts.max() <= 6.4
    assert shifts.min() < -6.2 and shifts.max() > 6.2
    counts, _ = np.histogram(shifts, bins=8, range=(-6.4, 6.4))
    assert counts.min() > 400 and counts.max() < 600  # 500 expected per bin


def test_same_key_same_batch_different_keys_differ(images):
    config = rj.Config()
    a = augment(jax.random.key(5), images, config)
    b = augment(jax.random.key(5), images, config)
    c = augment(jax.random.key(6), images, config)
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-3


def test_fractional_shifts_equal_image_data_generators_own_call():
    """Per image, what ImageDataGenerator(width_shift_range, height_shift_range, fill_mode='nearest')
    computes for a drawn (tx, ty): keras_preprocessing's apply_affine_transform calls
    scipy.ndimage.affine_transform(channel, identity, offset=(tx, ty), order=1, mode='nearest') on
    each channel, then flips. Shifts up to 0.1 * 32 and beyond the edge, any fraction."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    tx, ty = rng.uniform(-3.2, 3.2, (2, 16))
    tx[:2], ty[:2] = (-3.2, 3.2), (0.5, -2.75)  # the range's ends, a half pixel, a quarter
    flip = rng.random(16) < 0.5
    out = np.asarray(transform(jnp.asarray(x), jnp.asarray(tx), jnp.asarray(ty), jnp.asarray(flip)))
    for b in range(16):
        ref = np.stack(
            [
                ndimage.affine_transform(
                    x[b, :, :, c], np.eye(2), offset=(tx[b], ty[b]), order=1, mode="nearest"
                )
                for c in range(3)
            ],
            axis=-1,
        )
        ref = ref[:, ::-1] if flip[b] else ref
        np.testing.assert_allclose(out[b], ref, rtol=0, atol=2e-6)
