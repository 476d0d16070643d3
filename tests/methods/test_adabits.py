"""AdaBits: network layout and first/last-layer rules, joint training, switchable clipping, parameter groups,
eval-time bias rescale, unbuilt bit-widths, storage hand count, the centered weight scheme (option, storage,
2-bit training on digits), and the compare path end to end."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods.adabits as adabits_module
from harness.compare import run_comparison
from harness.config import Schedule
from harness.data import load_dataset
from harness.errors import ConfigError
from harness.method import Batch, RunContext
from harness.models import InputNorm
from harness.optim import build_optimizers
from harness.registry import get_method
from methods.adabits import AdaBitsConfig, RawImageInput
from methods.quant.modules import SwitchableBatchNorm2d
from methods.quant.pact import SwitchablePACT
from methods.quant.sat import sat_normalize, sat_rescale_factor, sat_weight
from methods.quant.sat_layers import SATConv2d, SATLinear

# The paper's CIFAR configuration: the departures from the harness topology it makes, and its weight scheme.
PAPER = {"raw_input": True, "quantize_stem": True, "quantize_head": True, "weight_scheme": "original"}


def build(bits=(2, 4, 8), model="resnet20", width=1.0, **options):
    """AdaBits as the paper configures it unless an option says otherwise."""
    info = load_dataset("synthetic").info
    method = get_method("adabits").from_options({**PAPER, **options})
    torch.manual_seed(0)
    return method, method.build(model, 10, bits, info, width)


def batch(n=6, seed=1) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator),
                 torch.arange(n))


def test_layout_follows_the_spec():
    _, model = build()
    assert isinstance(model.input_norm, RawImageInput)
    assert isinstance(model.stem, SATConv2d) and model.stem.input_quantizer is None  # input not quantized
    assert model.stem.weight_bits_rule == "highest"
    assert isinstance(model.stem_post[0], SwitchableBatchNorm2d) and type(model.stem_post[1]) is nn.ReLU
    block = model.blocks[3]  # first block of stage 2: downsampling, quantized shortcut with switchable BN
    for conv in (block.conv1, block.conv2, block.downsample[0]):
        assert isinstance(conv, SATConv2d) and conv.weight_bits_rule == "same"
        assert sorted(conv.input_quantizer.alphas) == ["2", "4", "8"]
        assert all(alpha.item() == 8.0 for alpha in conv.input_quantizer.alphas.values())
    assert isinstance(block.downsample[1], SwitchableBatchNorm2d)
    assert type(block.relu1) is nn.ReLU and type(block.relu2) is nn.ReLU  # PACT sits in the layers reading them
    assert isinstance(model.fc, SATLinear) and model.fc.weight_bits_rule == "max8"
    assert all(alpha.item() == 10.0 for alpha in model.fc.input_quantizer.alphas.values())
    _, fp_shortcut = build(fp_shortcut=True)
    assert type(fp_shortcut.blocks[3].downsample[0]) is nn.Conv2d
    assert type(fp_shortcut.blocks[3].downsample[1]) is nn.BatchNorm2d


def test_default_follows_the_harness_topology():
    info = load_dataset("synthetic").info
    model = get_method("adabits")().build("resnet20", 10, (2, 4, 8), info, 1.0)
    assert isinstance(model.input_norm, InputNorm)
    assert type(model.stem) is nn.Conv2d and type(model.fc) is nn.Linear  # full precision, unquantized inputs
    assert isinstance(model.blocks[0].conv1, SATConv2d) and model.blocks[0].conv1.weight_scheme == "centered"
    assert model.mbq_topology.departures == ()


def test_raw_input_is_the_rounded_8_bit_image():
    _, model = build()
    x = torch.tensor([0.0, 0.1, 0.5, 1.0]).view(1, 1, 2, 2)  # 255 x = [0, 25.5, 127.5, 255] -> round half to even
    assert model.input_norm(x).flatten().tolist() == [0.0, 26.0, 128.0, 255.0]
    _, normalized = build(raw_input=False)
    assert isinstance(normalized.input_norm, InputNorm)


def test_first_layer_uses_highest_bits_and_last_layer_max_b_8():
    _, model = build(bits=(2, 4, 5))
    model.eval()
    method = get_method("adabits")()
    method.set_bits(model, 2)
    x = torch.rand(2, 1, 8, 8) * 255
    stem_weight = sat_weight(model.stem.weight, 5)  # highest trained bit-width, not 2
    stem_weight = stem_weight * sat_rescale_factor(stem_weight, 16 * 9)
    torch.testing.assert_close(model.stem(x), F.conv2d(x, stem_weight, padding=1), rtol=0, atol=0)
    features = torch.rand(3, 64) * 12
    fc_weight = sat_weight(model.fc.weight, 8)  # max(2, 8)
    quantized_features = torch.round(features.clamp(max=10) / 10 * 3) / 3 * 10  # 2-bit input, alpha 10
    expected = quantized_features @ fc_weight.T + model.fc.bias / sat_rescale_factor(fc_weight, 10)
    torch.testing.assert_close(model.fc(features), expected, rtol=1e-6, atol=1e-5)
    _, imagenet_rules = build(bits=(2, 4, 5), stem_weight_bits="max8", head_weight_bits="highest")
    assert imagenet_rules.stem.weight_bits(2) == 8 and imagenet_rules.fc.weight_bits(2) == 5


def test_32_bits_runs_the_full_precision_path():
    _, model = build(bits=(2, 32))
    get_method("adabits")().set_bits(model, 32)
    conv = model.blocks[0].conv1
    x = torch.randn(2, 16, 8, 8) * 20  # not clipped, not rectified: nothing is quantized at 32 bits
    weight = sat_normalize(conv.weight)
    weight = weight * sat_rescale_factor(weight, 16 * 9)
    torch.testing.assert_close(conv(x), F.conv2d(x, weight, padding=1), rtol=0, atol=0)
    assert model.stem.weight_bits() == 32 and model.fc.weight_bits() == 32


def test_joint_training_runs_every_bit_width_highest_first_and_sums_gradients(monkeypatch):
    bits = (2, 4, 8)
    method, model = build(bits, width=0.25)
    model.train()
    reference = copy.deepcopy(model)
    data = batch()
    calls = []
    original_ce = F.cross_entropy

    def spy_ce(logits, target, *args, **kwargs):
        calls.append((model.fc.bits, target.clone()))
        return original_ce(logits, target, *args, **kwargs)

    monkeypatch.setattr(adabits_module.F, "cross_entropy", spy_ce)
    ctx = RunContext(bits=bits, device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    losses = method.train_step(model, data, ctx)
    assert [b for b, _ in calls] == [8, 4, 2] and all(torch.equal(target, data.y) for _, target in calls)
    assert set(losses) == {"loss_2", "loss_4", "loss_8"}
    assert ctx.passes == Counter({2: 6, 4: 6, 8: 6})

    # The step's gradient is the sum of the per-bit-width cross-entropy gradients (no weights, no distillation).
    summed: dict[str, torch.Tensor] = {}
    for b in (8, 4, 2):
        reference.zero_grad(set_to_none=True)
        method.set_bits(reference, b)
        original_ce(reference(data.x), data.y).backward()
        for name, param in reference.named_parameters():
            if param.grad is not None:
                summed[name] = summed[name] + param.grad if name in summed else param.grad.clone()
    named = dict(model.named_parameters())
    assert summed.keys() == {name for name, p in named.items() if p.grad is not None}
    for name, grad in summed.items():
        torch.testing.assert_close(named[name].grad, grad, rtol=1e-5, atol=1e-6 * (1 + grad.abs().max().item()))


def test_training_at_4_bits_changes_only_4_bit_alphas_and_bn():
    method, model = build((2, 4, 8), width=0.25)
    model.train()
    optimizers = build_optimizers(model, method.param_groups(model), Schedule(lr=0.05))
    before = copy.deepcopy(model.state_dict())
    ctx = RunContext(bits=(4,), device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    method.train_step(model, batch(16), ctx)
    for optimizer in optimizers:
        optimizer.step()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    per_bit = [name for name in before if ".alphas." in name or ".norms." in name]
    for name in per_bit:
        if ".alphas.4" in name or ".norms.4." in name:
            if not name.endswith("num_batches_tracked"):
                assert name in changed, name
        else:
            assert name not in changed, name
    shared_weights = [name for name in before if name.endswith(".weight") and ".norms." not in name]
    assert shared_weights and all(name in changed for name in shared_weights)


def test_alpha_norm_and_bias_get_no_weight_decay():
    method, model = build(width=0.25)
    optimizer, = build_optimizers(model, method.param_groups(model), Schedule(weight_decay=4e-5))
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(decay) == len(list(model.parameters()))  # every parameter in exactly one group
    for module in model.modules():
        if isinstance(module, SwitchablePACT):
            assert all(decay[id(p)] == 0.0 for p in module.parameters())
        elif isinstance(module, nn.BatchNorm2d):
            assert decay[id(module.weight)] == 0.0 and decay[id(module.bias)] == 0.0
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            assert decay[id(module.weight)] == 4e-5
    assert decay[id(model.fc.bias)] == 0.0
    with_norm_decay = get_method("adabits").from_options({"decay_norm_and_bias": "true"})
    groups = with_norm_decay.param_groups(model)
    assert [g.get("weight_decay") for g in groups] == [None, None, 0.0]


def test_alpha_lr_option_sets_the_alpha_group_base_lr():
    method, model = build(width=0.25, alpha_lr="0.5")
    optimizer, = build_optimizers(model, method.param_groups(model), Schedule(lr=0.05))
    alpha_ids = {id(p) for m in model.modules() if isinstance(m, SwitchablePACT) for p in m.parameters()}
    for group in optimizer.param_groups:
        in_group = {id(p) for p in group["params"]}
        assert group["base_lr"] == (0.5 if in_group == alpha_ids else 0.05)
    with pytest.raises(ConfigError):
        AdaBitsConfig(alpha_lr=-1.0)


def test_eval_forward_modifies_no_parameter():
    method, model = build(width=0.25)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    x = batch(8).x
    with torch.no_grad():
        for b in (8, 4, 2):
            method.set_bits(model, b)
            model(x)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unbuilt_or_unsupported_bit_widths_are_clear_errors():
    method, model = build((2, 8), width=0.25)
    with pytest.raises(ConfigError) as error:
        method.set_bits(model, 4)
    assert "built for bits [2, 8]" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="adabits supports bit-widths 1..8 and 32"):
        method.check_bits((2, 16))
    method.check_bits((1, 2, 3, 4, 5, 6, 7, 8, 32))


def test_config_validation_and_options():
    with pytest.raises(ConfigError):
        AdaBitsConfig(conv_alpha_init=0.0)
    with pytest.raises(ConfigError):
        get_method("adabits").from_options({"stem_weight_bits": "lowest"})
    cfg = get_method("adabits").from_options({"head_weight_bits": "highest", "raw_input": "false"}).cfg
    assert cfg.head_weight_bits == "highest" and cfg.raw_input is False


def sat_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SATConv2d, SATLinear))]


def test_weight_scheme_option_reaches_every_sat_layer():
    assert AdaBitsConfig().weight_scheme == "centered"  # the default; build() below asks for the paper's
    _, model = build(width=0.25)
    assert {layer.weight_scheme for layer in sat_layers(model)} == {"original"}
    method, model = build(width=0.25, weight_scheme="centered")
    assert method.cfg.weight_scheme == "centered"
    layers = sat_layers(model)
    assert len(layers) == 1 + 18 + 2 + 1  # stem, 18 block convs, 2 shortcut convs, classifier
    assert {layer.weight_scheme for layer in layers} == {"centered"}
    method.set_bits(model, 2)
    conv = model.blocks[0].conv1
    levels = torch.unique(conv.quantized_weight()).tolist()
    assert set(levels) <= {-0.75, -0.25, 0.25, 0.75}
    with pytest.raises(ConfigError, match="must be one of original, centered"):
        get_method("adabits").from_options({"weight_scheme": "modified"})
    with pytest.raises(ConfigError):
        AdaBitsConfig(weight_scheme="symmetric")


# Hand count of ResNet-20 (width 1: 16/32/64 channels), 1 input channel, 10 classes, bits (2, 4, 8).
# Quantized at b bits, one alpha each: 18 3x3 convs = 267,264 weights (stage 1: 6 x 16*16*9 = 13,824; stage 2:
#   16*32*9 + 5 x 32*32*9 = 50,688; stage 3: 32*64*9 + 5 x 64*64*9 = 202,752) and 2 shortcut convs 16*32 + 32*64
#   = 2,560 -> 269,824 weights, 20 alphas.
# Stem 1*16*9 = 144 weights at the highest bit-width (8), no alpha. FC 64*10 = 640 weights at max(b, 8) = 8,
#   bias 10 values, one alpha -> 21 alphas in all.
# Switchable BN channels: stem 16; 3 blocks x (16+16) = 96; 3 x (32+32) = 192; 3 x (64+64) = 384; shortcut BNs
#   32 + 64 = 96 -> 784 channels x 4 values (gamma, beta, running mean and variance).
QUANT_WEIGHTS, EIGHT_BIT_WEIGHTS, FP_VALUES, ALPHAS, BN_VALUES = 269_824, 144 + 640, 10, 21, 784 * 4


def test_storage_equals_hand_count():
    bits = (2, 4, 8)
    method, model = build(bits)
    for b in bits:
        expected = QUANT_WEIGHTS * b + EIGHT_BIT_WEIGHTS * 8 + (FP_VALUES + ALPHAS + BN_VALUES) * 32
        assert method.storage(model, b) * 8 == expected
    # one 8-bit copy of the weights serves every bit-width; BN and alphas are stored per bit-width
    total = QUANT_WEIGHTS * 8 + EIGHT_BIT_WEIGHTS * 8 + FP_VALUES * 32 + 3 * (ALPHAS + BN_VALUES) * 32
    assert method.storage_total(model, bits) * 8 == total
    # bits (3, 5): the stem at the highest (5) bits, the FC at max(b, 8) = 8
    method, model = build((3, 5))
    assert method.storage(model, 3) * 8 == (QUANT_WEIGHTS * 3 + 144 * 5 + 640 * 8
                                            + (FP_VALUES + ALPHAS + BN_VALUES) * 32)
    assert method.storage_total(model, (3, 5)) * 8 == (QUANT_WEIGHTS * 5 + 144 * 5 + 640 * 8 + FP_VALUES * 32
                                                       + 2 * (ALPHAS + BN_VALUES) * 32)


def test_centered_storage_equals_the_same_hand_count():
    # centered codes nest (b-bit code = 8-bit code >> (8 - b)), so the deployed set is still one 8-bit copy
    bits = (2, 4, 8)
    original, original_model = build(bits)
    centered, centered_model = build(bits, weight_scheme="centered")
    for b in bits:
        assert centered.storage(centered_model, b) == original.storage(original_model, b)
        assert centered.storage(centered_model, b) * 8 == (QUANT_WEIGHTS * b + EIGHT_BIT_WEIGHTS * 8
                                                           + (FP_VALUES + ALPHAS + BN_VALUES) * 32)
    assert centered.storage_total(centered_model, bits) * 8 == (QUANT_WEIGHTS * 8 + EIGHT_BIT_WEIGHTS * 8
                                                                + FP_VALUES * 32 + 3 * (ALPHAS + BN_VALUES) * 32)


def train_steps(method, model, optimizers, ctx, data, order, norms, losses_2) -> None:
    for step in range(50):
        indices = order[step * 32:(step + 1) * 32]
        step_batch = Batch(data.train.get_batch(indices), data.train.labels[indices], indices)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        losses = method.train_step(model, step_batch, ctx)
        assert set(losses) == {"loss_2", "loss_4", "loss_8"}
        assert all(math.isfinite(value) for value in losses.values()), (step, losses)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), step
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        losses_2.append(losses["loss_2"])
        for optimizer in optimizers:
            optimizer.step()


# 50 SGD steps (lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4 on the decayed group) of joint training at
# bits (2, 4, 8) on the real digits train split, resnet20 at width 0.25, batch 32, seed 0. Measured on CPU
# (torch 2.14): centered, largest gradient L2 norm over all parameters 26.1 (step 1, then <= 12.9), loss_2 3.15 ->
# 1.87 (mean of the last 5 steps); the paper's scheme in the same loop reaches 4.9e7 (step 3) and its loss_2 ends
# at 2.35 (with batch 64: 5.9e4, seed 1: 1.3e7, width 1.0 and batch 128: 2.4e19 with the 2-bit loss at 10 after 50
# steps). It stays finite, so only the centered run is asserted here.
def test_centered_scheme_trains_2_bit_jointly_on_digits_and_stays_bounded():
    data = load_dataset("digits")
    bits = (2, 4, 8)
    method = get_method("adabits").from_options({"weight_scheme": "centered"})
    torch.manual_seed(0)
    model = method.build("resnet20", data.info.num_classes, bits, data.info, 0.25)
    model.train()
    optimizers = build_optimizers(model, method.param_groups(model), Schedule(lr=0.05))
    ctx = RunContext(bits=bits, device=torch.device("cpu"), num_classes=data.info.num_classes, seed=0, epochs=1)
    generator = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(data.train), generator=generator) for _ in range(2)])
    norms, losses_2 = [], []
    # oneDNN's backward corrupts the heap on 4-channel convs (harness.runtime.needs_onednn_off); run_cell avoids it
    with torch.backends.mkldnn.flags(enabled=False):
        train_steps(method, model, optimizers, ctx, data, order, norms, losses_2)
    assert ctx.passes == Counter({b: 50 * 32 for b in bits})
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(norms) < 1e3  # measured 26.1; the paper's scheme: 4.9e7
    assert sum(losses_2[-5:]) / 5 < 0.75 * losses_2[0]  # the 2-bit network learns: measured 3.15 -> 1.87


def test_compare_runs_adabits_beside_the_other_methods(tiny_spec, tmp_path):
    spec = tiny_spec(methods=("adabits", "anyprecision", "dedicated"), bits=(2, 8), epochs=1)
    records, markdown = run_comparison(spec, tmp_path / "run", show_progress=False)
    record = next(r for r in records if r["method"] == "adabits")
    assert record["method_config"] == AdaBitsConfig().to_dict()
    method = get_method("adabits")()
    model = method.build("resnet20", 10, (2, 8), load_dataset("synthetic").info, 0.25)
    for b in ("2", "8"):
        result = record["results"][b]
        assert result["sample_passes"] == 192  # the training subset, once per bit-width per epoch
        assert result["storage_bytes"] == method.storage(model, int(b))  # analytic: independent of training
        correct = result["top1"] * 128 / 100  # 128 test images
        assert math.isclose(correct, round(correct), abs_tol=1e-6) and 0 <= result["top1"] <= 100
    assert record["storage_total_bytes"] == method.storage_total(model, (2, 8))
    assert "adabits" in markdown and "anyprecision" in markdown and "dedicated" in markdown
