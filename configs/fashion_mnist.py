"""Fashion-MNIST, a ViT or a ResNet, any noise.

    python -m noisy_flax.main --workdir workdirs/fm \
        --config configs/fashion_mnist.py:model=resnet18_small,noise=circulant,epochs=3

Arguments: model, noise (a noise type), site, layer, noise_train, noise_eval,
epochs, batch, lr, runlocal.
"""
from configs import common


def get_config(arg=None):
    a = common.small_data_args(arg, model="vit_nano_patch7_28", epochs=5.0, batch=128, lr=2e-3)
    c = common.base_config()
    set_data(c)
    c.input.cache = True

    common.set_model_and_noise(c, a)

    c.batch_size = a.batch
    c.eval_batch_size = 500
    c.optimizer = "adamw"
    c.lr = a.lr
    c.weight_decay = 1e-4
    c.schedule = "cosine"
    c.warmup_epochs = 0.2
    c.num_epochs = a.epochs
    c.label_smoothing = 0.0
    c.log_every = 100
    c.checkpoint_every = 1000
    return common.finalize(c, a.runlocal)


def set_data(c) -> None:
    """The dataset and its preprocessing (shared with configs/study_fashion_mnist.py)."""
    c.dataset = "fashion_mnist"
    c.train_split, c.eval_split = "train", "test"
    c.image_size = 28
    c.num_classes = 10
    c.input.channels = 1
    c.input.train_crop = "none"  # the images are already 28 x 28
    c.input.flip = True
    c.input.eval_resize = "resize"
    c.input.normalize = "minus_one_to_one"
