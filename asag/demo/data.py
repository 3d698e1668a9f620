"""scikit-learn's digits (8x8, 10 classes) as diffusion training and evaluation data."""

import numpy as np
import torch

NUM_CLASSES = 10


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) in [-1, 1], int64 labels. The
    split is stratified and fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> -1..1
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    as_images = lambda a: torch.from_numpy(a).unsqueeze(1)  # noqa: E731
    as_labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return as_images(x_train), as_labels(y_train), as_images(x_test), as_labels(y_test)


def held_out_splits(seed: int = 0):
    """The held-out digits cut in two stratified halves, ``(validation, test)``, each a pair
    (images, labels): methods are tuned against the first and judged against the second."""
    from sklearn.model_selection import train_test_split

    _, _, x, y = load_digits_split(seed)
    x_val, x_test, y_val, y_test = train_test_split(x, y, test_size=0.5, random_state=seed, stratify=y.numpy())
    return (x_val, y_val), (x_test, y_test)
