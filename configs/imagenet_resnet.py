"""ResNet on ImageNet-1k from scratch (the standard 90-epoch SGD recipe).

Arguments: depth (18, 34, 50, 101, 152), noise, layer, stage, noise_train,
noise_eval, epochs, batch, runlocal.
"""
from configs import common
from configs.imagenet import imagenet_base, runlocal_model


def get_config(arg=None):
    a = common.parse_arg(arg, depth=50, noise="none", stage=4, layer=-1, noise_train=True,
                         noise_eval=True, epochs=90.0, batch=1024, runlocal=False)
    c = imagenet_base(224)
    c.model = f"resnet{a.depth}"
    c.input.normalize = "imagenet"
    c.noise.update(type=a.noise, site="block_input", stage=a.stage, layer=a.layer,
                   train=a.noise_train, eval=a.noise_eval)
    c.batch_size = a.batch
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.nesterov = True
    c.lr = 0.1 * a.batch / 256  # linear scaling rule
    c.weight_decay = 1e-4
    c.schedule = "cosine"
    c.warmup_epochs = 5.0
    c.num_epochs = a.epochs
    c.label_smoothing = 0.1
    if a.runlocal:
        runlocal_model(c, "resnet18_small")
    return common.finalize(c, a.runlocal)
