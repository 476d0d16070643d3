"""MBQuant, ImageNet MobileNetV1, bits 2/4/6/8."""

from harness.presets import Preset
from harness.presets.mbquant_imagenet_resnet18 import IMAGENET_NEEDS, RECIPE

PRESET = Preset(
    name="mbquant-imagenet-mobilenetv1",
    title="MBQuant (Pattern Recognition 2025), ImageNet, MobileNetV1, bits 2/4/6/8",
    dataset="imagenet",
    model="mobilenetv1",
    bits=(2, 4, 6, 8),
    methods=("mbquant", "anyprecision", "adabits"),
    schedule=RECIPE,
    notes=(
        "MobileNetV1 (Howard et al. 2017): full-precision 3x3 stride-2 stem and classifier; every depthwise and "
        "pointwise convolution quantized. MBQuant: 4 branches, each a MobileNetV1 body, sharing the stem.",
        "Recipe from the authors' README: SGD lr 0.1 wd 1e-4 cosine, 90 epochs, batch 256; bounds Adam 1e-4.",
        "The paper's result table could not be read offline: every published cell is empty and shown unverified.",
    ),
    data_needs=IMAGENET_NEEDS,
)
