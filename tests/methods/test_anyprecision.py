"""Any-Precision: recursive distillation order and targets, network layout, storage hand count."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import methods.anyprecision as anyprecision_module
from harness.data import load_dataset
from harness.method import Batch, RunContext
from harness.registry import get_method
from methods.quant.modules import QuantConv2d, SwitchableBatchNorm2d


def build(bits=(1, 2, 4, 8, 32), model="preact_resnet20", **options):
    info = load_dataset("synthetic").info
    method = get_method("anyprecision").from_options(options)
    torch.manual_seed(0)
    return method, method.build(model, 10, bits, info, 1.0)


def test_train_step_runs_bits_in_descending_order_with_recursive_teachers(monkeypatch):
    bits = (1, 2, 4, 8, 32)
    method, model = build(bits)
    model.train()
    torch.manual_seed(1)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    calls = []
    original_ce, original_soft = F.cross_entropy, anyprecision_module.soft_cross_entropy

    def spy_ce(logits, target, *a, **k):
        calls.append(("ce", model_bits(model), target.clone()))
        return original_ce(logits, target, *a, **k)

    def spy_soft(logits, teacher):
        calls.append(("soft", model_bits(model), teacher.clone()))
        return original_soft(logits, teacher)

    monkeypatch.setattr(anyprecision_module.F, "cross_entropy", spy_ce)
    monkeypatch.setattr(anyprecision_module, "soft_cross_entropy", spy_soft)
    ctx = RunContext(bits=bits, device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    losses = method.train_step(model, Batch(x, y, torch.arange(6)), ctx)

    assert [(kind, b) for kind, b, _ in calls] == [("ce", 32), ("soft", 8), ("soft", 4), ("soft", 2), ("soft", 1)]
    assert torch.equal(calls[0][2], y)
    # Each teacher is the detached softmax of the next-higher bit-width's output on the same batch; weights do
    # not change inside the step (the harness steps the optimizer afterwards), so recomputing them is exact.
    for (_, _, teacher), higher in zip(calls[1:], (32, 8, 4, 2)):
        method.set_bits(model, higher)
        with torch.no_grad():
            expected = F.softmax(model(x), dim=1)
        assert torch.equal(teacher, expected)
    assert set(losses) == {f"loss_{b}" for b in bits}
    assert ctx.passes == Counter({b: 6 for b in bits})
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def model_bits(model: nn.Module) -> int:
    return next(m.bits for m in model.modules() if isinstance(m, QuantConv2d))


def test_distill_none_uses_labels_for_every_bit_width(monkeypatch):
    method, model = build((2, 8), distill="none")
    kinds = []
    monkeypatch.setattr(anyprecision_module, "soft_cross_entropy", lambda *a: kinds.append("soft"))
    ctx = RunContext(bits=(2, 8), device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    method.train_step(model, Batch(torch.rand(4, 1, 8, 8), torch.arange(4), torch.arange(4)), ctx)
    assert kinds == []


def test_preact_layout_follows_the_spec():
    _, model = build((2, 32), fp_shortcut=True)
    assert type(model.stem) is nn.Conv2d and type(model.fc) is nn.Linear  # full-precision first and last layers
    assert isinstance(model.final_norm, SwitchableBatchNorm2d)  # head: switchable BN -> pool -> FC
    block = model.blocks[3]  # first block of stage 2: downsampling
    assert type(block.act1) is nn.ReLU and isinstance(block.conv1, QuantConv2d)  # quantizer at the conv input
    assert block.conv1.input_quantizer is not None and block.conv1.weight_quantizer is not None
    shortcut = block.shortcut[0]  # the code's quirk: full-precision weights reading the quantized activation
    assert isinstance(shortcut, QuantConv2d) and shortcut.weight_quantizer is None
    assert shortcut.input_quantizer is not None and type(block.shortcut[1]) is nn.BatchNorm2d
    _, quantized_shortcut = build((2, 32))  # the default: the harness topology
    assert quantized_shortcut.blocks[3].shortcut[0].weight_quantizer is not None
    assert isinstance(quantized_shortcut.blocks[3].shortcut[1], SwitchableBatchNorm2d)
    _, post_activation = build((2, 32), model="resnet20")
    assert isinstance(post_activation.blocks[3].downsample[0], QuantConv2d)
    assert isinstance(post_activation.blocks[3].downsample[1], SwitchableBatchNorm2d)
    assert type(post_activation.blocks[3].relu2) is nn.ReLU  # the residual stream stays full precision


# Hand count of the pre-activation ResNet-20 (width 1: 16/32/64 channels), 1 input channel, 10 classes.
# Quantized 3x3 convs (18, one 32-bit scale E each):
#   stage 1: 6 x 16*16*9 = 13,824; stage 2: 16*32*9 + 5 x 32*32*9 = 4,608 + 46,080 = 50,688;
#   stage 3: 32*64*9 + 5 x 64*64*9 = 18,432 + 184,320 = 202,752  -> 267,264 weights.
# Full precision: stem 1*16*9 = 144; shortcuts 16*32 + 32*64 = 2,560; FC 64*10 + 10 = 650  -> 3,354 values.
# Switchable BN channels: stage 1: 3 x (16+16) = 96; stage 2: (16+32) + 2 x (32+32) = 176;
#   stage 3: (32+64) + 2 x (64+64) = 352; final BN 64  -> 688 channels x 4 values (gamma, beta, mean, var).
# Shared shortcut BNs: 32 + 64 = 96 channels x 4 values.
QUANT_WEIGHTS, QUANT_LAYERS, FP_VALUES, SWITCH_BN_VALUES, SHARED_BN_VALUES = 267_264, 18, 3_354, 688 * 4, 96 * 4


def test_storage_equals_hand_count():
    bits = (1, 2, 4, 8, 32)
    method, model = build(bits, fp_shortcut=True)
    fixed = (FP_VALUES + SWITCH_BN_VALUES + SHARED_BN_VALUES) * 32
    for b in bits:  # one scale E per quantized conv below 32 bits; at 32 it is part of the 32-bit weights
        scales = QUANT_LAYERS * 32 if b < 32 else 0
        assert method.storage(model, b) * 8 == QUANT_WEIGHTS * b + scales + fixed
    # the latent weights serve every bit-width (each computes its own E from them)
    total_bits = QUANT_WEIGHTS * 32 + (FP_VALUES + SHARED_BN_VALUES) * 32 + 5 * SWITCH_BN_VALUES * 32
    assert method.storage_total(model, bits) * 8 == total_bits
    highest_method, highest_model = build((2, 4, 8), total_storage="highest", fp_shortcut=True)
    assert highest_method.storage_total(highest_model, (2, 4, 8)) * 8 == (
        QUANT_WEIGHTS * 8 + (QUANT_LAYERS + FP_VALUES + SHARED_BN_VALUES) * 32 + 3 * SWITCH_BN_VALUES * 32)


def test_dedicated_storage_is_the_sum_of_independent_networks():
    info = load_dataset("synthetic").info
    dedicated = get_method("dedicated").from_options({"fp_shortcut": "true"})
    bits = (2, 8)
    model = dedicated.build("preact_resnet20", 10, bits, info, 1.0)
    fixed = (QUANT_LAYERS + FP_VALUES + SWITCH_BN_VALUES + SHARED_BN_VALUES) * 32
    assert [dedicated.storage(model, b) * 8 for b in bits] == [QUANT_WEIGHTS * b + fixed for b in bits]
    assert dedicated.storage_total(model, bits) * 8 == sum(QUANT_WEIGHTS * b + fixed for b in bits)
