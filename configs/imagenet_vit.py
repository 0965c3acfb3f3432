"""ViT on ImageNet-1k from scratch: a DeiT-family recipe, not a published run.

AdamW at lr 1e-3 per 1024 images (DeiT's 5e-4 per 512), weight decay 0.05,
label smoothing 0.1, drop path 0.1, gradient clipping at 1.0, 10k warm-up
steps then cosine, RandAugment (2, 15) on torchvision's 31-level magnitude
scale (rotations up to 15 degrees). It is not big_vision's vit_i1k.py, which
trains at lr 1e-3 for batch 4096 with decoupled weight decay 1e-4, mixup and
RandAugment on a 10-level scale (its magnitude 15 rotates up to 45 degrees).

Arguments: variant (Ti/16, S/16, B/16, B/32, L/16), res, noise, site, layer,
noise_train, noise_eval, epochs, batch, runlocal.
"""
from configs import common
from configs.imagenet import imagenet_base, runlocal_model

SIZES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}


def vit_name(variant: str, res: int) -> str:
    size, _, patch = variant.partition("/")
    if size not in SIZES or not patch.isdigit():
        raise ValueError(f"variant={variant!r} should look like B/16 (sizes {', '.join(SIZES)})")
    return f"vit_{SIZES[size]}_patch{patch}_{res}"


def get_config(arg=None):
    a = common.parse_arg(arg, variant="B/16", res=224, noise="none", site="attn_input",
                         layer=-1, noise_train=True, noise_eval=True, epochs=300.0,
                         batch=4096, runlocal=False)
    c = imagenet_base(a.res)
    c.model = vit_name(a.variant, a.res)
    c.model_kwargs.drop_path_rate = 0.1
    c.input.randaugment = (2, 15)
    c.input.normalize = "minus_one_to_one"
    c.noise.update(type=a.noise, site=a.site, layer=a.layer, train=a.noise_train,
                   eval=a.noise_eval)
    c.batch_size = a.batch
    c.optimizer = "adamw"
    c.lr = 1e-3 * a.batch / 1024  # linear scaling from batch 1024
    c.b2 = 0.999
    c.weight_decay = 0.05
    c.schedule = "cosine"
    c.warmup_steps = 10_000
    c.num_epochs = a.epochs
    c.label_smoothing = 0.1
    c.grad_clip_norm = 1.0
    if a.runlocal:
        runlocal_model(c, "vit_nano_patch4_32")
    return common.finalize(c, a.runlocal)
