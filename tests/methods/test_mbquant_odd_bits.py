"""MBQuant at odd bit-widths (the partial branch) and on MobileNetV1: slices, MACs and storage by hand."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from harness.data import DatasetInfo
from harness.method import Batch, RunContext
from harness.registry import get_method
from methods.mbquant_networks import MOBILENETV1_PARTIAL
from methods.quant.bounded import HALF_NORMAL_STD_FACTOR
from methods.quant.branch_selection import amortized_selection, partial_branch
from methods.quant.branches import BranchConv2d, quantize_weight_2bit

BITS = (2, 3, 4, 5, 6, 7, 8)


def build(info, bits=BITS, width=0.25, model="resnet20", **options):
    method = get_method("mbquant").from_options(options)
    torch.manual_seed(0)
    return method, method.build(model, 10, bits, info, width)


def read_mask(conv: BranchConv2d, bits: int) -> torch.Tensor:
    """True where the ``bits``-bit network reads ``conv``'s weight: its full branches and its partial slice."""
    start, count = conv.selection[bits]
    mask = torch.zeros_like(conv.weight, dtype=torch.bool)
    mask[start * conv.out_per_branch:(start + count) * conv.out_per_branch] = True
    branch = partial_branch(conv.selection, bits)
    if branch is not None:
        rows = slice(branch * conv.out_per_branch, branch * conv.out_per_branch + conv.partial_out)
        if conv.depthwise:
            mask[rows] = True
        else:
            mask[rows, :conv.partial_in] = True
    return mask


@pytest.mark.parametrize("model", ["resnet8", "resnet20", "preact_resnet20", "resnet18", "mobilenetv1"])
def test_odd_bits_read_exactly_their_branches_and_partial_slice(synthetic, model):
    """Zeroing every weight outside the selected slices leaves the output unchanged; zeroing one inside the partial
    slice changes it."""
    width = 0.125 if model in ("resnet18", "mobilenetv1") else 0.25
    method, net = build(synthetic.info, width=width, model=model)
    method.prepare(net, synthetic.train, RunContext(bits=BITS, device=torch.device("cpu"), num_classes=10, seed=0,
                                                    epochs=1))
    net.train()  # batch statistics: an untrained network's running statistics would silence deep layers
    x = synthetic.test.get_batch(torch.arange(8))
    for bits in (3, 5, 7):
        method.set_bits(net, bits)
        saved = [conv.weight.detach().clone() for conv in net.branch_convs()]
        with torch.no_grad():
            reference = net(x)
            for conv in net.branch_convs():
                conv.weight[~read_mask(conv, bits)] = 0.0
            assert torch.equal(net(x), reference), bits
            partial = net.branch_convs()[len(saved) // 2]
            branch = partial_branch(partial.selection, bits)
            partial.weight[branch * partial.out_per_branch] = 0.0  # the partial slice's first filter
            assert not torch.equal(net(x), reference), bits
            for conv, weight in zip(net.branch_convs(), saved):
                conv.weight.copy_(weight)


def test_odd_bit_activations_carry_the_partial_branch_channels(synthetic):
    method, net = build(synthetic.info)
    shapes = {}
    block = net.blocks[4]  # stage 2: 8 channels per branch, partial 6 at width 0.25
    block.conv1.register_forward_hook(lambda m, i, out: shapes.update(conv1=out.shape[1]))
    x = synthetic.test.get_batch(torch.arange(2))
    with torch.no_grad():
        for bits, (_, count) in amortized_selection(BITS).items():
            method.set_bits(net, bits)
            assert net(x).shape == (2, 10)
            assert shapes["conv1"] == count * 8 + (6 if bits % 2 else 0)


def resnet20_partial_macs_8x8() -> int:
    """The partial branch of ResNet-20 at width 0.25 on 8x8 inputs (4/8/16 channels per branch, partial 4/6/12,
    stem partial 4, the last conv widening to 16), by hand."""
    stage1 = 6 * 64 * 4 * 4 * 9  # 6 convs 4 -> 4, 3x3, 8x8 positions
    stage2 = 16 * (6 * 4 * 9 + 6 * 6 * 9 + 6 * 4 + 4 * 6 * 6 * 9)  # 4x4: conv1 4->6, conv2, 1x1 shortcut, 4 more
    stage3 = 4 * (12 * 6 * 9 + 12 * 12 * 9 + 12 * 6 + 3 * 12 * 12 * 9 + 16 * 12 * 9)  # 2x2, last conv 12 -> 16
    return stage1 + stage2 + stage3


def test_odd_bit_macs_are_its_full_branches_plus_the_partial_slice(synthetic):
    method, net = build(synthetic.info)
    net.eval()
    macs: list[int] = []

    def count(conv, inputs, output):
        positions = output.shape[-2] * output.shape[-1]
        _, active = conv.window
        kernel = conv.weight.shape[-1] ** 2
        full = active * conv.out_per_branch * conv.in_per_branch * kernel
        part = conv.partial_out * conv.partial_in * kernel if conv.bits % 2 else 0
        assert output.shape[1] == active * conv.out_per_branch + (conv.partial_out if conv.bits % 2 else 0)
        macs.append(positions * (full + part))

    for conv in net.branch_convs():
        conv.register_forward_hook(count)
    x = synthetic.test.get_batch(torch.arange(1))
    per_bits = {}
    for bits in BITS:
        macs.clear()
        method.set_bits(net, bits)
        with torch.no_grad():
            net(x)
        per_bits[bits] = sum(macs)
    one_branch = per_bits[2]
    assert {b: per_bits[b] for b in (3, 5, 7)} == {b: (b // 2) * one_branch + resnet20_partial_macs_8x8()
                                                   for b in (3, 5, 7)}


def test_odd_bit_storage_is_the_even_one_plus_the_partial_branch_by_hand(synthetic):
    """storage(3) - storage(2): the partial slices' 2-bit weights, one more activation-bound pair per quantized
    conv, the partial channels of every BN, the stem's partial rows and their slice of the stem BN."""
    method, net = build(synthetic.info, bits=(2, 3, 4))
    weights = (6 * 4 * 4 * 9 + (6 * 4 * 9 + 6 * 6 * 9 + 6 * 4 + 4 * 6 * 6 * 9)
               + (12 * 6 * 9 + 12 * 12 * 9 + 12 * 6 + 3 * 12 * 12 * 9 + 16 * 12 * 9))
    quantized_convs = 20  # 18 body convs + 2 projection shortcuts
    bn_channels = 6 * 4 + 7 * 6 + (6 * 12 + 16)
    stem = 4 * 1 * 3 * 3  # 4 partial rows of the 1-channel 3x3 stem
    stem_bn = 4
    hand = weights * 2 + 32 * (2 * quantized_convs + 4 * bn_channels + stem + 4 * stem_bn)
    assert (method.storage(net, 3) - method.storage(net, 2)) * 8 == hand


def test_partial_slices_store_their_own_codes():
    """Storage for a set: a partial slice is quantized with its own weight bounds, so its 2-bit codes are not those
    of its branch, and an artifact stores them even where some bit-width runs that branch whole."""
    def conv(bits):
        from methods.quant.branch_selection import num_branches
        return BranchConv2d(4, 8, 3, 1, 1, num_branches(bits), amortized_selection(bits), partial_in=3, partial_out=5)

    slice_weights = 5 * 3 * 9
    branch_weights = 8 * 4 * 9
    # {2, 3}: branch 0 whole, branch 1 only as 3's partial slice. Activation bounds 2 x (1) for 2 bits, 2 x (1 + 1)
    # for 3 bits; no weight bounds (the 2-bit levels do not depend on them).
    assert conv((2, 3)).storage_bits_total((2, 3)) == (branch_weights + slice_weights) * 2 + 32 * (2 + 4)
    # {2, 3, 4}: branch 1 is run whole at 4 bits, and 3's slice of it still has codes of its own.
    layer = conv((2, 3, 4))
    assert layer.storage_bits_total((2, 3, 4)) == (2 * branch_weights + slice_weights) * 2 + 32 * (2 + 4 + 4)
    assert conv((2, 3)).storage_bits(3) == (branch_weights + slice_weights) * 2 + 32 * 4
    with torch.no_grad():
        layer.set_bits(3)
        partial_levels = layer.active_partial_weight()
        layer.set_bits(4)
        start, _ = layer.window
        rows = (1 - start) * 8
        branch_levels = layer.active_weight()[rows:rows + 5, :3]
    assert not torch.equal(partial_levels, branch_levels)  # the same latent weights, other bounds, other codes


def test_partial_bounds_initialize_from_the_partial_slice():
    torch.manual_seed(0)
    conv = BranchConv2d(4, 8, 3, 1, 1, 2, amortized_selection((2, 3)), partial_in=3, partial_out=5)
    partial = conv.weight[8:13, :3]
    assert conv.partial_weight_upper[1] == 3 * partial.std() and conv.partial_weight_lower[1] == -3 * partial.std()
    x = torch.randn(6, 4 + 3, 5, 5)
    conv.set_bits(3)
    conv.calibrating = True
    conv(x)
    assert conv.act_lower["3"].tolist() == [x[:, :4].min().item(), x[:, 4:].min().item()]
    expected_upper = 3 * x[:, 4:].std() / HALF_NORMAL_STD_FACTOR
    assert conv.act_upper["3"][1] == expected_upper


def test_position_bounds_give_the_partial_branch_the_next_positions_pair():
    torch.manual_seed(0)
    conv = BranchConv2d(4, 8, 3, 1, 1, 2, amortized_selection((2, 3)), partial_in=3, partial_out=5,
                        bounds_by="position")
    assert not hasattr(conv, "partial_weight_lower")
    conv.set_bits(3)  # window (0, 1): the partial branch sits at window position 1
    with torch.no_grad():
        conv.weight_lower[1], conv.weight_upper[1] = -0.1, 0.1
    expected = quantize_weight_2bit(conv.weight[8:13, :3], torch.tensor(-0.1), torch.tensor(0.1))
    assert torch.equal(conv.active_partial_weight(), expected)


def test_odd_bits_train_with_in_place_distillation(synthetic):
    method, net = build(synthetic.info, bits=(2, 3, 4))
    indices = torch.arange(16)
    ctx = RunContext(bits=(2, 3, 4), device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    method.prepare(net, synthetic.train, ctx)
    batch = Batch(synthetic.train.get_batch(indices), synthetic.train.labels[indices], indices)
    losses = method.train_step(net, batch, ctx)
    assert sorted(losses) == ["loss_2", "loss_3", "loss_4"] and all(math.isfinite(v) for v in losses.values())
    assert ctx.passes == Counter({2: 16, 3: 16, 4: 16})
    partial_bounds = [conv.partial_weight_upper.grad for conv in net.branch_convs() if conv.quantized]
    assert all(g is not None and g[1] != 0 for g in partial_bounds)  # the 3-bit partial branch (branch 1) learns


# MobileNetV1 (Howard et al., Table 1) at ImageNet size, width 1, by hand: stem 3x3x3x32 + BN 32; each block a
# 3x3 depthwise conv (9 C_in) + BN C_in and a 1x1 pointwise conv (C_in C_out) + BN C_out; FC 1024 x 1000 + 1000.
MOBILENET_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
MOBILENET_PARAMS = (3 * 3 * 3 * 32 + 2 * 32
                    + sum(9 * c_in + 2 * c_in + c_in * c_out + 2 * c_out
                          for c_in, c_out in zip(MOBILENET_CHANNELS, MOBILENET_CHANNELS[1:]))
                    + 1024 * 1000 + 1000)
IMAGENET = DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "none")


def test_mobilenetv1_parameter_count_is_the_hand_count():
    from harness.models import create_model
    model = create_model("mobilenetv1", num_classes=1000, in_chans=3, mean=IMAGENET.mean, std=IMAGENET.std,
                         image_size=224)
    assert MOBILENET_PARAMS == 4_231_976
    assert sum(p.numel() for p in model.parameters()) == MOBILENET_PARAMS
    assert model.stem.stride == (2, 2)
    assert create_model("mobilenetv1", num_classes=10, in_chans=1, mean=(0.5,), std=(0.5,),
                        image_size=8).stem.stride == (1, 1)


def test_mbquant_mobilenetv1_branches_store_one_8_bit_copy_of_the_body():
    """G = 4 branches of 2-bit weights = 8 bits per base weight of the 26 quantized convs."""
    method, net = build(IMAGENET, bits=(2, 4, 6, 8), width=1.0, model="mobilenetv1")
    body = sum(9 * c_in + c_in * c_out for c_in, c_out in zip(MOBILENET_CHANNELS, MOBILENET_CHANNELS[1:]))
    weight_bits = sum(conv.weight.numel() * 2 for conv in net.branch_convs())
    assert weight_bits == body * 8
    assert len(net.branch_convs()) == 26
    _, odd = build(IMAGENET, bits=(2, 3), width=1.0, model="mobilenetv1")
    assert [block.pointwise.partial_out for block in odd.blocks] == list(MOBILENETV1_PARTIAL) + [1024]
    assert odd.blocks[0].depthwise.partial_in == 32  # the partial branch reads the whole stem copy
