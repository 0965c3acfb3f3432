"""The published NoisyViT run (NoisyViT-OptimalQ), setting for setting.

    --config configs/noisyvit_imagenet.py:variant=B/16,res=384 \
    --config.init_from=/path/to/augreg_B_16_384.npz

recipe=published (default) reproduces the released code: augreg weights
fine-tuned with AdamW at lr 1e-6 for 50 epochs, batch 16, cosine to 1e-7
after 10 warm-up epochs that start at lr 0 (the rate changes once per
epoch, so epoch 0 trains at lr 0), label smoothing 0.1, RandAugment on the
whole image then random-resized crop (area 0.05-1), ImageNet mean/std,
evaluation by plain resize in class-sorted order with batches of 10 per
device, noise OFF in training and optimal-Q noise ON at evaluation, at the
attention input of block 11; the best checkpoint on validation is kept.

recipe=corrected changes what the audit questions: the normalisation augreg
weights expect (mean = std = 0.5), shuffled evaluation batches, and noise in
training as well as at evaluation.
"""
import ml_collections

from configs import common
from configs.imagenet import imagenet_base, runlocal_model
from configs.imagenet_vit import vit_name

RECIPES = ("published", "corrected")


def get_config(arg=None):
    a = common.parse_arg(arg, variant="B/16", res=384, recipe="published", runlocal=False)
    if a.recipe not in RECIPES:
        raise ValueError(f"recipe={a.recipe!r}; use one of {RECIPES}")
    published = a.recipe == "published"
    c = imagenet_base(a.res)
    c.model = vit_name(a.variant, a.res)
    c.dtype = "float32"  # the released run trained in fp32
    c.init_required = True  # lr 1e-6 for 50 epochs only makes sense from the augreg weights

    c.input.randaugment = (2, 9)  # torchvision RandAugment() defaults,
    c.input.randaugment_before_crop = True  # on the whole image, before the crop
    c.input.crop_area = (0.05, 1.0)
    c.input.flip = False
    c.input.eval_resize = "resize"  # Resize((res, res)), no centre crop
    c.input.normalize = "imagenet" if published else "minus_one_to_one"

    c.noise.update(type="optimal_q", site="attn_input", layer=11, scope="device",
                   train=not published, eval=True)
    # The released evaluation mixed batches of 10 on one GPU: 10 per device.
    c.eval_batch_size = ml_collections.config_dict.placeholder(int)
    c.eval_batch_per_device = 10
    c.eval_order = "class_sorted" if published else "shuffled"
    c.save_best = True

    c.batch_size = 16
    c.optimizer = "adamw"
    c.lr = 1e-6
    c.end_lr = 1e-7
    c.warmup_init_lr = 0.0
    c.warmup_epochs = 10.0
    c.schedule = "cosine"
    c.schedule_unit = "epoch"  # timm's scheduler, stepped per epoch: epoch 0 trains at lr 0
    c.warmup_prefix = False  # timm's CosineLRScheduler: the cosine runs over all 50 epochs
    c.num_epochs = 50.0
    c.weight_decay = 1e-4
    c.wd_mask = "all"  # torch.optim.AdamW decays every parameter
    c.label_smoothing = 0.1
    c.eval_every = 0
    c.eval_every_epochs = 1.0  # Main.py evaluates after every epoch: best of 50
    if a.runlocal:
        runlocal_model(c, "vit_nano_patch4_32")
        c.noise.layer = -1
        c.eval_batch_per_device = 2
    return common.finalize(c, a.runlocal)
