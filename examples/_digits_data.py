"""The digits data set that ships inside scikit-learn, split and batched for the examples.

Nothing is downloaded: ``sklearn.datasets.load_digits`` reads 1,797 8x8 images from the package.
Batches are ``(images, labels)`` tuples of numpy arrays with a leading global-batch axis, the
element format ``strategy.experimental_distribute_dataset`` takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_FEATURES = 64
NUM_CLASSES = 10


class Digits(NamedTuple):
    """Train and test images (float32, scaled to [0, 1], flattened to 64) and int32 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """Loads digits and splits it into stratified train and test sets (1,437 and 360 images)."""
    images, labels = load_digits(return_X_y=True)
    split = train_test_split(
        (images / 16.0).astype(np.float32),
        labels.astype(np.int32),
        test_size=test_fraction,
        stratify=labels,
        random_state=seed,
    )
    train_images, test_images, train_labels, test_labels = split
    return Digits(train_images, train_labels, test_images, test_labels)


def train_batches(
    images: np.ndarray, labels: np.ndarray, global_batch_size: int, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Full global batches forever, reshuffled every epoch (tf.data's shuffle, repeat, batch).

    The few examples left over at the end of an epoch are skipped, as with
    ``batch(drop_remainder=True)``; each epoch's shuffle skips different ones.
    """
    if global_batch_size > len(images):
        raise ValueError(
            f"global batch {global_batch_size} is larger than the {len(images)} training "
            "examples; use a smaller --batch-size"
        )
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - global_batch_size + 1, global_batch_size):
            rows = order[start : start + global_batch_size]
            yield images[rows], labels[rows]


def eval_batches(
    images: np.ndarray, labels: np.ndarray, global_batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every example once, in order; the last batch is partial when the sizes do not divide."""
    return [
        (images[start : start + global_batch_size], labels[start : start + global_batch_size])
        for start in range(0, len(images), global_batch_size)
    ]
