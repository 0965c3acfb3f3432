"""Fine-tune pretrained weights (init_from) on a smaller dataset.

    --config configs/transfer.py:dataset=cifar10,model=vit_base_patch16_224 \
    --config.init_from=/path/to/augreg_B_16.npz

The head is replaced for the new classes. Arguments: dataset (cifar10,
cifar100, oxford_iiit_pet), model, noise, noise_train, noise_eval, steps,
batch, lr, runlocal.
"""
from configs import common

DATASETS = {  # classes, train split, eval split
    "cifar10": (10, "train", "test"),
    "cifar100": (100, "train", "test"),
    "oxford_iiit_pet": (37, "train", "test"),
}


def get_config(arg=None):
    a = common.parse_arg(arg, dataset="cifar10", model="vit_base_patch16_224", noise="none",
                         noise_train=True, noise_eval=True, steps=10_000, batch=512, lr=0.01,
                         runlocal=False)
    if a.dataset not in DATASETS:
        raise ValueError(f"dataset={a.dataset!r}; use one of {', '.join(DATASETS)}")
    c = common.base_config()
    c.dataset = a.dataset
    c.num_classes, c.train_split, c.eval_split = DATASETS[a.dataset]
    c.model = a.model
    is_resnet = a.model.startswith("resnet")
    resolution = a.model.rsplit("_", 1)[-1]
    if not (is_resnet or resolution.isdigit()):
        raise ValueError(f"model={a.model!r} must end in its resolution, e.g. "
                         "vit_small_patch16_224")
    c.image_size = 224 if is_resnet else int(resolution)
    c.input.channels = 3
    c.input.train_crop = "random_resized"
    c.input.crop_area = (0.25, 1.0)
    c.input.flip = True
    c.input.eval_resize = "resize"
    c.input.normalize = "imagenet" if is_resnet else "minus_one_to_one"
    c.noise.update(type=a.noise, site="block_input" if is_resnet else "attn_input",
                   train=a.noise_train, eval=a.noise_eval)
    # New classes: a fresh head. Patterns match whole names, and one that
    # matches nothing is refused as a typo, so only this model's head is named.
    c.init_dont_load = ("fc/.*",) if is_resnet else ("head/.*",)
    c.init_required = True
    c.batch_size = a.batch
    c.eval_batch_size = 512
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.lr = a.lr
    c.weight_decay = 0.0
    c.schedule = "cosine"
    c.warmup_steps = 500
    c.total_steps = a.steps
    c.num_epochs = 0.0
    c.grad_clip_norm = 1.0
    c.eval_every = 1000
    c.dtype = "bfloat16"
    if a.runlocal:
        c.model = "resnet18_small" if is_resnet else "vit_nano_patch4_32"
        c.image_size = 32
        c.model_kwargs = {"num_layers": 1} if not is_resnet else {"width": 8}
        c.dtype = "float32"
    return common.finalize(c, a.runlocal)
