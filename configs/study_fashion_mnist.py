"""The noise study on Fashion-MNIST: noises x protocols x {ViT, ResNet} x seeds.

    python -m noisy_flax.study --config configs/study_fashion_mnist.py --workdir workdirs/study

Sized to finish within an hour on a shared 2-core CPU: a 4-block nano ViT
with 7 x 7 patches and a width-8 ResNet-18 on a slice of the train split,
evaluation on a stratified slice of the test split (50 per class, as in
ImageNet's validation set). Each (arch, seed) pre-trains one clean model
(``pretrain_steps``) and fine-tunes it ``steps`` more steps once per
training noise (the published recipes also fine-tune pre-trained weights).
Training without noise is the same for the 'none' and 'eval only'
protocols, and training with a noise is the same for 'train only' and
'both' (they differ at test time only), so each fine-tuned model is
evaluated under several noise settings.

Arguments: seeds (how many), per_class (test examples per class), runlocal.
"""
import ml_collections

from configs import common, fashion_mnist
from noisy_flax.batch_order import ORDERS

# label -> noise fields; 'none' is the clean reference.
NOISES = (
    dict(label="none", type="none"),
    dict(label="optimal_q", type="optimal_q"),
    dict(label="circulant_0.1", type="circulant", alpha=0.1),
    dict(label="circulant_0.3", type="circulant", alpha=0.3),
    dict(label="circulant_0.4", type="circulant", alpha=0.4),
    dict(label="within_image", type="within_image", q="optimal"),
    dict(label="gaussian_0.1", type="gaussian", strength=0.1),
    dict(label="gaussian_1.0", type="gaussian", strength=1.0),
    dict(label="salt_pepper_0.05", type="salt_pepper", prob=0.05),
    dict(label="salt_pepper_0.3", type="salt_pepper", prob=0.3),
)

ARCHS = (
    # The published ViT site: attention input of the last block.
    dict(name="vit", model="vit_nano_patch7_28", model_kwargs=dict(num_layers=4),
         site="attn_input", layer=-1, stage=4, lr=2e-3, pretrain_steps=60, steps=20, batch=128),
    # The published CNN site: input of the last block of stage 4.
    dict(name="resnet", model="resnet18_small", model_kwargs=dict(width=8),
         site="block_input", layer=-1, stage=4, lr=2e-3, pretrain_steps=24, steps=8, batch=128),
)


def get_config(arg=None):
    a = common.parse_arg(arg, seeds=3, per_class=50, runlocal=False)
    c = common.base_config()
    fashion_mnist.set_data(c)
    c.optimizer = "adamw"
    c.weight_decay = 1e-4
    c.schedule = "cosine"
    c.plot = False

    s = c.study = ml_collections.ConfigDict()
    s.archs = ARCHS
    s.noises = NOISES
    s.protocols = ("train_only", "eval_only", "both")
    s.seeds = tuple(range(a.seeds))
    s.orders = ORDERS
    s.eval_batch_size = 10  # the published test batch
    s.eval_per_class = a.per_class  # stratified slice of the test split
    s.train_examples = 20_000  # the first n of the train split (eval preprocessing + flips)
    s.warmup_fraction = 0.1
    s.entropy = True
    s.probe_steps = 100
    s.order_seed = 0  # shuffled orders and noise keys

    if a.runlocal:
        s.archs = tuple(dict(arch, pretrain_steps=2, steps=1, batch=16,
                             model_kwargs=dict(num_layers=1) if arch["name"] == "vit"
                             else dict(width=4)) for arch in ARCHS)
        s.noises = tuple(n for n in NOISES if n["label"] in
                         ("none", "optimal_q", "circulant_0.3", "gaussian_0.1"))
        s.seeds = (0, 1)
        s.eval_per_class = 3
        s.train_examples = 64
        s.probe_steps = 20
    c.runlocal = a.runlocal
    return common.finalize(c, False)  # the study sizes itself; no apply_runlocal
