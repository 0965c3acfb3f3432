"""The published NoisyCNN run (NoisyCNN_CircularShiftQ), setting for setting.

    --config configs/noisycnn_imagenet.py:variant=resnet34 \
    --config.init_from=/path/to/resnet34.safetensors

torchvision weights with the fc head re-initialised, AdamW lr 1e-3 (PyTorch's
default weight decay 0.01), cosine over 100 epochs to 1e-9, batch 512,
RandomResizedCrop(224, area 0.05-1), ImageNet mean/std, circulant Q with
alpha 0.4 and no gradient through the added term, at the input of the last
block of stage 4, ON in training and evaluation. Evaluated as dataloader.py
and Main.py do: after every epoch, Resize((224, 224)) without a crop, test
batches of 512 in the class-sorted order of ImageFolder's SequentialSampler,
the best model kept; CosineAnnealingLR stepped once per epoch. Switched to the other noise
types (``--config.noise.type=gaussian`` or ``salt_pepper``), it uses that
script's values too: Gaussian strength 1.0, impulse probability 1.0.
"""
from configs import common
from configs.imagenet import imagenet_base, runlocal_model

VARIANTS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def get_config(arg=None):
    a = common.parse_arg(arg, variant="resnet34", runlocal=False)
    if a.variant not in VARIANTS:
        raise ValueError(f"variant={a.variant!r}; use one of {VARIANTS}")
    c = imagenet_base(224)
    c.model = a.variant
    c.dtype = "float32"
    c.input.crop_area = (0.05, 1.0)
    c.input.flip = False
    c.input.normalize = "imagenet"
    c.init_dont_load = ("fc/.*",)  # the released code re-initialises the head
    c.init_required = True  # it fine-tunes torchvision's weights
    c.noise.update(type="circulant", alpha=0.4, stop_gradient=True, site="block_input",
                   stage=4, layer=-1, scope="device", train=True, eval=True,
                   strength=1.0, prob=1.0)
    c.batch_size = 512
    c.optimizer = "adamw"
    c.lr = 1e-3
    c.end_lr = 1e-9
    c.schedule = "cosine"
    c.num_epochs = 100.0
    c.schedule_unit = "epoch"  # CosineAnnealingLR, stepped after each epoch
    c.weight_decay = 0.01
    c.wd_mask = "all"
    c.input.eval_resize = "resize"
    c.eval_batch_size = 512  # the test loader takes args.batch_size
    c.eval_order = "class_sorted"
    c.eval_every = 0
    c.eval_every_epochs = 1.0
    c.save_best = True
    if a.runlocal:
        runlocal_model(c, "resnet18_small")
    return common.finalize(c, a.runlocal)
