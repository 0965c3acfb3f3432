"""What the ImageNet configs share: data, augmentation and evaluation."""
from configs import common


def imagenet_base(res: int = 224):
    c = common.base_config()
    c.dataset = "imagenet2012"
    c.train_split, c.eval_split = "train", "validation"
    c.num_classes = 1000
    c.image_size = res
    c.input.channels = 3
    c.input.train_crop = "random_resized"
    c.input.crop_area = (0.08, 1.0)
    c.input.flip = True
    c.input.eval_resize = "resize_crop"
    c.input.crop_fraction = 0.875
    c.input.shuffle_buffer = 250_000
    c.eval_batch_size = 1024
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
    c.dtype = "bfloat16"
    return c


def runlocal_model(c, model: str):
    """Tiny model and image for smoke runs of an ImageNet-sized recipe."""
    c.model = model
    c.image_size = 32
    c.model_kwargs = {"num_layers": 1} if model.startswith("vit") else {"width": 8}
    c.dtype = "float32"
    c.input.shuffle_buffer = 64
    return c
