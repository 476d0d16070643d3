"""Train augmentation and eval views: pad-crop + flip, RandomResizedCrop parameters, resize + center crop.

Every random draw comes from an explicit ``torch.Generator`` (never the global RNG), so the same generator state
gives bit-identical images; the geometric kernels are torchvision's transforms v2 functionals.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RESIZED_CROP_TRIES = 10


def crop_flip_at(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Zero-pad ``(B, C, H, W)`` by ``padding``, crop sample b at (top[b], left[b]) back to HxW, flip where flip[b].

    ``top``/``left`` are offsets into the padded image, in ``[0, 2 * padding]``; the deterministic core of
    ``augment_crop_flip``.
    """
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    if x.device.type == "cpu":
        top, left, flip = top.long(), left.long(), flip.bool()
    else:
        # one copy to the device for the three draws, which does not wait for it (a copy from pageable host memory
        # is staged before the call returns, so the CPU tensors may go at once)
        top, left, flip = torch.stack((top.long(), left.long(), flip.long())).to(x.device, non_blocking=True)
        flip = flip.bool()
    rows = top[:, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(width, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # reading columns right to left is the horizontal flip
    channels_last = padded.permute(0, 2, 3, 1)  # advanced indexing over (B, H, W) keeps C as the trailing dim
    gathered = channels_last[torch.arange(batch, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return gathered.permute(0, 3, 1, 2).contiguous()


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per sample: zero-pad by ``padding``, random crop back to HxW, random horizontal flip with p=0.5.

    Draws, in this order and only from ``generator``: ``top = randint(0, 2p+1, (B,))``, ``left = randint(0, 2p+1,
    (B,))``, ``flip = rand(B) < 0.5``.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    batch = x.shape[0]
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    return crop_flip_at(x, top, left, flip, padding)


def random_resized_crop_params(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = RESIZED_CROP_SCALE,
    ratio: tuple[float, float] = RESIZED_CROP_RATIO,
) -> tuple[int, int, int, int]:
    """Sample ``(top, left, crop_h, crop_w)`` for RandomResizedCrop using only ``generator``.

    Area fraction is uniform in ``scale`` and aspect ratio (w/h) log-uniform in ``ratio``; after
    ``RESIZED_CROP_TRIES`` draws that do not fit, fall back to the largest centered crop with a ratio in range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(RESIZED_CROP_TRIES):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator).item())
            return top, left, crop_h, crop_w
    return _center_crop_params(height, width, ratio)


def _center_crop_params(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, max(1, min(height, round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, max(1, min(width, round(height * ratio[1])))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resize_center_crop(image: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """Eval view of a ``(C, H, W)`` image: shorter side to ``resize`` (skipped if already), then center crop."""
    if min(image.shape[-2:]) != resize:
        image = TF.resize(image, [resize], antialias=True)
    return TF.center_crop(image, [crop, crop])


def crop_flip_one(image: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """``augment_crop_flip`` of one ``(C, H, W)`` image (any dtype) with its own generator.

    Draws, in this order: ``top, left = randint(0, 2p+1, (2,))``, ``flip = rand(1) < 0.5``.
    """
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator)
    flip = torch.rand(1, generator=generator) < 0.5
    return crop_flip_at(image[None], top[None], left[None], flip, padding)[0]


def random_resized_crop_flip(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop to ``size`` x ``size`` (antialiased) then a horizontal flip with p=0.5, of one image.

    The crop parameters are ``random_resized_crop_params`` (torchvision v2 ``RandomResizedCrop``'s algorithm,
    drawn from ``generator``), then one flip draw; the resampling is v2's ``resized_crop`` kernel.
    """
    height, width = image.shape[-2:]
    top, left, crop_h, crop_w = random_resized_crop_params(height, width, generator)
    view = TF.resized_crop(image, top, left, crop_h, crop_w, [size, size], antialias=True)
    if bool(torch.rand(1, generator=generator).item() < 0.5):
        view = view.flip(-1)
    return view
