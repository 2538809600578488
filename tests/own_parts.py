"""What a researcher brings to resnet_jax, for the tests: a BatchNorm-free CNN, one with dropout,
an SGD + cosine optimizer, augmentations. Importable from a subprocess (the SIGKILL tests)."""

import flax.linen as nn
import jax.numpy as jnp
import optax


class CNN(nn.Module):
    """Two strided convolutions and a dense head on the flattened map, no BatchNorm."""

    features: tuple = (8, 16)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3, 3), strides=(2, 2))(x))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class DropoutCNN(nn.Module):
    """A CNN with dropout before its head (rate 0.5 while training)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        x = nn.Dropout(0.5, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(self.num_classes)(x)


def sgd_cosine(steps_per_epoch, epochs=3, peak=0.05):
    """SGD with momentum on a cosine schedule spanning the run; its rate injected (so shown)."""
    schedule = optax.cosine_decay_schedule(peak, decay_steps=epochs * steps_per_epoch)
    return optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)


def blank(key, images):
    """Every image replaced by zeros: nothing left to learn from."""
    return jnp.zeros_like(images)


def identity(key, images):
    return images
