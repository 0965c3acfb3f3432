"""Fashion-MNIST, a ViT or a ResNet, any noise.

    python -m noisy_flax.main --workdir workdirs/fm \
        --config configs/fashion_mnist.py:model=resnet18_small,noise=circulant,epochs=3

Arguments: model, noise (a noise type), site, layer, noise_train, noise_eval,
epochs, batch, lr, runlocal.
"""
from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, model="vit_nano_patch7_28", noise="optimal_q", site="",
                         layer=-1, noise_train=True, noise_eval=True, epochs=5.0, batch=128,
                         lr=2e-3, runlocal=False)
    c = common.base_config()
    c.dataset = "fashion_mnist"
    c.train_split, c.eval_split = "train", "test"
    c.image_size = 28
    c.num_classes = 10
    c.input.channels = 1
    c.input.train_crop = "none"  # the images are already 28 x 28
    c.input.flip = True
    c.input.eval_resize = "resize"
    c.input.normalize = "minus_one_to_one"
    c.input.cache = True

    c.model = a.model
    is_resnet = a.model.startswith("resnet")
    c.noise.type = a.noise
    # The published sites: attention input of the last ViT block; input of the
    # last block of ResNet stage 4.
    c.noise.site = a.site or ("block_input" if is_resnet else "attn_input")
    c.noise.layer = a.layer
    c.noise.train, c.noise.eval = a.noise_train, a.noise_eval

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
