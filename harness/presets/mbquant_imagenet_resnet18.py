"""MBQuant, ImageNet ResNet-18: bits 2/4/6/8 and the {2, 3, 4} setting."""

from harness.config import Schedule
from harness.presets import Preset

RECIPE = Schedule(epochs=90, batch_size=256, eval_batch_size=256, optimizer="sgd", lr=0.1, momentum=0.9,
                  nesterov=False, weight_decay=1e-4, lr_schedule="cosine", augment=True)
IMAGENET_NEEDS = "ImageNet in ImageFolder layout under --data-root (imagenet/train/<wnid>/, imagenet/val/<wnid>/)"

EVEN = Preset(
    name="mbquant-imagenet-resnet18",
    title="MBQuant (Pattern Recognition 2025), ImageNet, ResNet-18, bits 2/4/6/8",
    dataset="imagenet",
    model="resnet18",
    bits=(2, 4, 6, 8),
    methods=("mbquant", "anyprecision", "adabits"),
    schedule=RECIPE,
    notes=(
        "Recipe from the authors' README: SGD lr 0.1 wd 1e-4 cosine, 90 epochs, batch 256; bounds Adam 1e-4.",
        "The paper's result table could not be read offline: every published cell is empty and shown unverified.",
        "ImageNet training takes days on a GPU; use --epochs/--train-subset only to check the pipeline.",
    ),
    data_needs=IMAGENET_NEEDS,
)

ODD = Preset(
    name="mbquant-imagenet-resnet18-234",
    title="MBQuant (Pattern Recognition 2025), ImageNet, ResNet-18, bits 2/3/4",
    dataset="imagenet",
    model="resnet18",
    bits=(2, 3, 4),
    methods=("mbquant:selection=serial", "anyprecision", "adabits"),
    schedule=RECIPE,
    notes=(
        "The {2, 3, 4} setting: G = 2 branches; 3 bits run branch 0 and the partial slice of branch 1 (40/76/184/396 "
        "channels per stage at width 1, the authors' code). Serial selection with the 4-bit network as the "
        "in-place distillation teacher, as the authors' code does for this set.",
        "Recipe from the authors' README: SGD lr 0.1 wd 1e-4 cosine, 90 epochs, batch 256; bounds Adam 1e-4.",
        "The paper's result table could not be read offline: every published cell is empty and shown unverified.",
    ),
    data_needs=IMAGENET_NEEDS,
)

PRESETS = (EVEN, ODD)
