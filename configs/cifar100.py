"""CIFAR-100 from scratch. Arguments: model, noise, site, layer, noise_train,
noise_eval, epochs, batch, lr, runlocal (see cifar.py)."""
from configs.cifar import cifar_config


def get_config(arg=None):
    return cifar_config("cifar100", 100, arg)
