"""The embedded default: NoisyViT on real Fashion-MNIST, in minutes on a CPU.

A small ViT (width 64, 6 blocks, 7 x 7 patches) with optimal-Q linear-transform
noise at the published site, the attention input of the last block, mixing
each device's batch, in training and evaluation (the published NoisyViT
trained without it: configs/noisyvit_imagenet.py). Arguments as in
fashion_mnist.py.
"""
from configs import fashion_mnist


def get_config(arg=None):
    return fashion_mnist.get_config(arg)
