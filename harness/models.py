"""Full-precision model definitions and a factory by name.

Models are plain PyTorch modules. Methods quantize them through the harness's topology
(:mod:`harness.topology`), which finds the layers with a special part in quantized networks by their ``mbq_role``
attribute:

* ``"input"``: the input normalization (data-set mean and std), never quantized;
* ``"stem"``: the first convolution, full precision in every method here;
* ``"head"``: the classifier, full precision in every method here;
* ``"shortcut"`` / ``"shortcut_norm"``: the projection convolution / its batch norm on a downsampling shortcut.

Architectures: ResNet-20 (He et al., CVPR 2016, Sec. 4.2, option B shortcuts), the pre-activation ResNet-20 of
Any-Precision DNNs (Yu et al., AAAI 2021, code ``resnet20q``), and torchvision's ResNet-18 with a 3x3 stride-1
stem and no max-pool for small images (torchvision's stem at ImageNet size), MobileNetV1 (Howard et al., arXiv
1704.04861, Table 1; a stride-1 stem for small images) and DeiT-Tiny (timm).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import ResNet

from harness.errors import ConfigError


def tag(module: nn.Module, role: str) -> nn.Module:
    module.mbq_role = role
    return module


def role_of(module: nn.Module) -> str | None:
    return getattr(module, "mbq_role", None)


class InputNorm(nn.Module):
    """``(x - mean) / std`` per channel; preprocessing, so it counts for no storage."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.mbq_role = "input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def storage_bits(self, bits: int) -> int:
        return 0

    def storage_bits_total(self, bits_set) -> int:
        return 0


def conv3x3(in_chans: int, out_chans: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)


def projection(in_chans: int, out_chans: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        tag(nn.Conv2d(in_chans, out_chans, 1, stride, bias=False), "shortcut"),
        tag(nn.BatchNorm2d(out_chans), "shortcut_norm"),
    )


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU; each ReLU its own module so methods can swap each."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if downsample is None and (stride != 1 or inplanes != planes):
            downsample = projection(inplanes, planes, stride)
        elif downsample is not None:
            tag(downsample[0], "shortcut")
            tag(downsample[1], "shortcut_norm")
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class PreActBlock(nn.Module):
    """BN-act-conv-BN-act-conv plus shortcut; a downsampling shortcut reads the first activation's output."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.act1 = nn.ReLU()
        self.conv1 = conv3x3(in_chans, out_chans, stride)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.act2 = nn.ReLU()
        self.conv2 = conv3x3(out_chans, out_chans)
        self.shortcut = projection(in_chans, out_chans, stride) if stride != 1 or in_chans != out_chans else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.act1(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(activated))


def stage_widths(width: float) -> tuple[int, int, int]:
    base = max(1, int(round(16 * width)))
    return base, 2 * base, 4 * base


class CifarResNet(nn.Module):
    """Three stages of ``blocks_per_stage`` blocks on small images (He et al.'s CIFAR family, depth
    ``6 n + 2``: 3 blocks ResNet-20, 1 block ResNet-8), global average pool, linear classifier."""

    def __init__(self, num_classes: int, in_chans: int, mean, std, width: float = 1.0, preact: bool = False,
                 blocks_per_stage: int = 3):
        super().__init__()
        widths = stage_widths(width)
        self.input_norm = InputNorm(mean, std)
        self.stem = tag(conv3x3(in_chans, widths[0]), "stem")
        self.stem_post = nn.Identity() if preact else nn.Sequential(nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        in_width = widths[0]
        for stage, out_width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(PreActBlock(in_width, out_width, stride) if preact else
                              BasicBlock(in_width, out_width, stride))
                in_width = out_width
        self.blocks = nn.Sequential(*blocks)
        # Pre-activation nets end with a BN before pooling; Any-Precision puts no ReLU/quantizer before the FC.
        self.final_norm = nn.BatchNorm2d(in_width) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = tag(nn.Linear(in_width, num_classes), "head")
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_post(self.stem(self.input_norm(x)))
        x = self.pool(self.final_norm(self.blocks(x)))
        return self.fc(torch.flatten(x, 1))


def init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ResNet18(ResNet):
    """torchvision's ResNet-18; for images under 128 pixels (or no size given) the stem is a 3x3 stride-1 conv
    without max-pool, at ImageNet size torchvision's 7x7 stride-2 conv and max-pool. ``width`` scales every
    stage (``64w/128w/256w/512w`` channels)."""

    SMALL_INPUT_LIMIT = 128

    def __init__(self, num_classes: int, in_chans: int, mean, std, width: float = 1.0,
                 image_size: int | None = None) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width_per_group=64)
        base = max(1, int(round(64 * width)))
        if base != 64:  # the same layers at base/2base/4base/8base channels (torchvision fixes 64)
            self.inplanes = base
            self.bn1 = nn.BatchNorm2d(base)
            self.layer1 = self._make_layer(BasicBlock, base, 2)
            self.layer2 = self._make_layer(BasicBlock, 2 * base, 2, stride=2)
            self.layer3 = self._make_layer(BasicBlock, 4 * base, 2, stride=2)
            self.layer4 = self._make_layer(BasicBlock, 8 * base, 2, stride=2)
            self.fc = nn.Linear(8 * base, num_classes)
        self.input_norm = InputNorm(mean, std)
        if image_size is not None and image_size >= self.SMALL_INPUT_LIMIT:
            self.conv1 = tag(nn.Conv2d(in_chans, base, 7, 2, 3, bias=False), "stem")
        else:
            self.conv1 = tag(nn.Conv2d(in_chans, base, 3, 1, 1, bias=False), "stem")
            self.maxpool = nn.Identity()
        tag(self.fc, "head")
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_norm(x))


# MobileNetV1's depthwise-separable blocks (Howard et al., Table 1): (output channels, stride of the depthwise conv).
MOBILENETV1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)
MOBILENETV1_STEM = 32


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU (no residual)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_chans, in_chans, 3, stride, 1, groups=in_chans, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.relu1 = nn.ReLU()
        self.pointwise = nn.Conv2d(in_chans, out_chans, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.pointwise(self.relu1(self.bn1(self.depthwise(x))))))


def mobilenetv1_widths(width: float) -> tuple[int, tuple[int, ...]]:
    """Stem channels and each block's output channels at ``width`` (the paper's width multiplier alpha)."""
    def scale(channels: int) -> int:
        return max(1, int(round(channels * width)))

    return scale(MOBILENETV1_STEM), tuple(scale(c) for c, _ in MOBILENETV1_BLOCKS)


class MobileNetV1(nn.Module):
    """MobileNetV1: a full-precision 3x3 stem (stride 2 at 128 pixels and more, else stride 1), 13
    depthwise-separable blocks, global average pool, linear classifier. ``width`` scales every layer."""

    SMALL_INPUT_LIMIT = 128

    def __init__(self, num_classes: int, in_chans: int, mean, std, width: float = 1.0,
                 image_size: int | None = None) -> None:
        super().__init__()
        stem_width, widths = mobilenetv1_widths(width)
        stride = 2 if image_size is not None and image_size >= self.SMALL_INPUT_LIMIT else 1
        self.input_norm = InputNorm(mean, std)
        self.stem = tag(nn.Conv2d(in_chans, stem_width, 3, stride, 1, bias=False), "stem")
        self.stem_post = nn.Sequential(nn.BatchNorm2d(stem_width), nn.ReLU())
        blocks, in_width = [], stem_width
        for out_width, (_, block_stride) in zip(widths, MOBILENETV1_BLOCKS):
            blocks.append(DepthwiseSeparable(in_width, out_width, block_stride))
            in_width = out_width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = tag(nn.Linear(in_width, num_classes), "head")
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem_post(self.stem(self.input_norm(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


MIN_PATCH = 2  # a one-pixel token carries no local structure: 8x8 digits as 64 such tokens did not learn
MAX_TOKENS_PER_SIDE = 8


def vit_patch_size(image_size: int) -> int:
    """16 at ImageNet size; for small images the smallest patch of at least 2 pixels that divides the image and
    gives at most 8 x 8 tokens (8x8 digits: 2, so 4 x 4 tokens; 28x28: 4; 32x32: 4)."""
    if image_size >= 224:
        return 16
    fitting = [p for p in range(MIN_PATCH, image_size + 1)
               if image_size % p == 0 and image_size // p <= MAX_TOKENS_PER_SIDE]
    return min(fitting) if fitting else image_size


class DeiT(nn.Module):
    """A DeiT (Touvron et al., ICML 2021) built locally with timm, no pretrained weights: 3 heads, MLP ratio 4,
    a class token; the patch size follows the image size (:func:`vit_patch_size`); ``width`` scales the embedding
    dimension ``base_dim`` (kept divisible by the 3 heads).

    ``deit_tiny`` is DeiT-Tiny (embed 192, depth 12), the network of EMQ's ViT tables. ``deit_micro`` is the same
    block at half depth and half width (embed 96, depth 6, heads of 32): the ViT a 2-core CPU trains on digits to
    95 % in about a minute (``results/measured/vit-digits.md``), where DeiT-Tiny takes 5 s per epoch and overfits
    the 1,437 images before it gets there.
    """

    def __init__(self, num_classes: int, in_chans: int, mean, std, width: float = 1.0, image_size: int = 32, *,
                 depth: int, base_dim: int):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        embed_dim = 3 * max(1, int(round(base_dim / 3 * width)))
        self.input_norm = InputNorm(mean, std)
        self.vit = VisionTransformer(img_size=image_size, patch_size=vit_patch_size(image_size), in_chans=in_chans,
                                     num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=3)
        tag(self.vit.patch_embed.proj, "stem")
        tag(self.vit.head, "head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.input_norm(x))


ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {
    "resnet20": lambda **kw: CifarResNet(preact=False, **kw),
    "preact_resnet20": lambda **kw: CifarResNet(preact=True, **kw),
    # ResNet-20's shallowest sibling: a third of its layers, for CPU-sized defaults on 8x8 digits
    "resnet8": lambda **kw: CifarResNet(preact=False, blocks_per_stage=1, **kw),
    "resnet18": ResNet18,
    "mobilenetv1": MobileNetV1,
    "deit_tiny": functools.partial(DeiT, depth=12, base_dim=192),
    "deit_micro": functools.partial(DeiT, depth=6, base_dim=96),
}
VIT_MODELS = ("deit_tiny", "deit_micro")
NEEDS_IMAGE_SIZE = VIT_MODELS
USES_IMAGE_SIZE = (*VIT_MODELS, "resnet18", "mobilenetv1")
CONVOLUTIONAL_MODELS = ("resnet8", "resnet20", "preact_resnet20", "resnet18", "mobilenetv1")


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, *, num_classes: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 width: float = 1.0, image_size: int | None = None) -> nn.Module:
    """Build the full-precision model ``name``; unknown names raise :class:`ConfigError`.

    ``image_size`` is needed by models whose shape depends on it (the ViT); convolutional models ignore it.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if width <= 0:
        raise ConfigError(f"model width must be positive, got {width}")
    extra = {}
    if name in NEEDS_IMAGE_SIZE and image_size is None:
        raise ConfigError(f"model {name!r} needs the image size of the data set")
    if name in USES_IMAGE_SIZE:
        extra["image_size"] = image_size
    return MODELS[name](num_classes=num_classes, in_chans=in_chans, mean=tuple(mean), std=tuple(std), width=width,
                        **extra)
