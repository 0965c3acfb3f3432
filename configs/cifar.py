"""CIFAR-10 / CIFAR-100 from scratch with a small ViT or ResNet (shared by
cifar10.py and cifar100.py)."""
from configs import common


def cifar_config(dataset: str, num_classes: int, arg=None):
    a = common.small_data_args(arg, model="vit_small_patch4_32", epochs=100.0, batch=512,
                               lr=1e-3)
    c = common.base_config()
    c.dataset = dataset
    c.train_split, c.eval_split = "train", "test"
    c.num_classes = num_classes
    c.image_size = 32
    c.input.channels = 3
    c.input.train_crop = "random_resized"
    c.input.crop_area = (0.35, 1.0)
    c.input.flip = True
    c.input.randaugment = (2, 9)
    c.input.eval_resize = "resize"
    c.input.normalize = "minus_one_to_one"
    c.input.cache = True

    common.set_model_and_noise(c, a)
    if not a.model.startswith("resnet"):
        c.model_kwargs.drop_path_rate = 0.1

    c.batch_size = a.batch
    c.eval_batch_size = 1000
    c.optimizer = "adamw"
    c.lr = a.lr
    c.weight_decay = 0.05
    c.schedule = "cosine"
    c.warmup_epochs = 5.0
    c.num_epochs = a.epochs
    c.label_smoothing = 0.1
    c.grad_clip_norm = 1.0
    c.eval_every = 2000
    c.log_every = 100
    c.checkpoint_every = 2000
    if a.runlocal:  # a one-block model: the smoke run tests the pipeline, not the width
        c.model_kwargs = {"num_layers": 1} if not a.model.startswith("resnet") else {"width": 8}
    return common.finalize(c, a.runlocal)
