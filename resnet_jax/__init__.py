"""resnet_jax: the seed Keras ResNet v1 on CIFAR-10, reproduced in JAX/Flax.

Notebook API: Config, ResNet, load_dataset / Dataset, augment, create_train_state, train_step,
eval_step, train_and_evaluate, restore, predict.
"""

from resnet_jax.augment import augment
from resnet_jax.config import Config, tiny
from resnet_jax.data import Dataset, load_dataset
from resnet_jax.errors import UserError
from resnet_jax.models import ResNet
from resnet_jax.optim import lr_for_epoch, make_optimizer, scale_by_keras_adam, schedule
from resnet_jax.steps import TrainState, create_train_state, eval_step, l2_penalty, predict, train_step
from resnet_jax.loop import evaluate_checkpoint, restore, train_and_evaluate
