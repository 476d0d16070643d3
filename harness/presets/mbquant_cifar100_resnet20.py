"""MBQuant, CIFAR-100 ResNet-20, bits 2/4/6/8, against AnyPrecision and AdaBits (the paper's comparison)."""

from harness.config import Schedule
from harness.presets import Preset

PRESET = Preset(
    name="mbquant-cifar100-resnet20",
    title="MBQuant (Pattern Recognition 2025), CIFAR-100, ResNet-20, bits 2/4/6/8",
    dataset="cifar100",
    model="resnet20",
    bits=(2, 4, 6, 8),
    methods=("mbquant", "anyprecision", "adabits"),
    schedule=Schedule(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False,
                      weight_decay=1e-4, lr_schedule="cosine", augment=True),
    notes=(
        "Recipe from the authors' README: SGD lr 0.1 wd 1e-4 cosine, 200 epochs, batch 128; quantizer bounds Adam "
        "1e-4 (MBQuant's own parameter group).",
        "The paper's result table could not be read offline: every published cell is empty and shown unverified.",
        "AnyPrecision and AdaBits run under MBQuant's schedule here (unified recipe), not their own.",
    ),
    data_needs="CIFAR-100 python files under --data-root (cifar-100-python/)",
)
