"""Local tfds builders; importing this package registers them with tfds."""
from noisy_flax.datasets import fashion_mnist_local
from noisy_flax.datasets.fashion_mnist_local import FashionMnistLocal

__all__ = ["fashion_mnist_local", "FashionMnistLocal"]
