"""MBQuant, ImageNet ResNet-18, bits 2/4/6/8."""

from harness.config import Schedule
from harness.presets import Preset

PRESET = Preset(
    name="mbquant-imagenet-resnet18",
    title="MBQuant (Pattern Recognition 2025), ImageNet, ResNet-18, bits 2/4/6/8",
    dataset="imagenet",
    model="resnet18",
    bits=(2, 4, 6, 8),
    methods=("mbquant", "anyprecision", "adabits"),
    schedule=Schedule(epochs=90, batch_size=256, eval_batch_size=256, optimizer="sgd", lr=0.1, momentum=0.9,
                      nesterov=False, weight_decay=1e-4, lr_schedule="cosine", augment=True),
    notes=(
        "Recipe from the authors' README: SGD lr 0.1 wd 1e-4 cosine, 90 epochs, batch 256; bounds Adam 1e-4.",
        "The paper's result table could not be read offline: every published cell is empty and shown unverified.",
        "ImageNet training takes days on a GPU; use --epochs/--train-subset only to check the pipeline.",
    ),
    data_needs="ImageNet in ImageFolder layout under --data-root (imagenet/train/<wnid>/, imagenet/val/<wnid>/)",
)
