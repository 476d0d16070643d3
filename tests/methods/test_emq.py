"""EMQ: network layout, training step, coresets, BN adaptation, resume, storage, ViT (the config: test_emq_config.py;
the bit-wise scoring phase: test_emq_scoring.py)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods.emq as emq_module
from harness.config import Schedule
from harness.data import SubsetImageSet
from harness.errors import ConfigError
from harness.method import Batch, RunContext
from harness.registry import get_method
from harness.store import RunStore
from harness.train import run_cell
from methods.emq import EMQ, EMQConfig
from methods.quant.bias_correction import BiasCorrectedQuantizer
from methods.quant.lsq import LSQActivation
from methods.quant.modules import QuantConv2d
from methods.quant.shared_bn import SharedBatchNorm2d
from methods.quant.vit import QuantLinear


def build(synthetic, bits=(2, 4, 8), model="resnet20", width=0.25, **options):
    method = get_method("emq").from_options(options)
    torch.manual_seed(0)
    return method, method.build(model, 10, bits, synthetic.info, width)


def context(synthetic, bits, **kw) -> RunContext:
    schedule = kw.pop("schedule", Schedule(epochs=2, batch_size=32, lr=0.05))
    return RunContext(bits=bits, device=torch.device("cpu"), num_classes=10, seed=kw.pop("seed", 0), epochs=2,
                      data_info=synthetic.info, schedule=schedule, **kw)


def batch_of(data, indices) -> Batch:
    indices = torch.as_tensor(indices)
    return Batch(data.get_batch(indices), data.labels[indices], indices)


def small_train(synthetic, size=64):
    return SubsetImageSet(synthetic.train, torch.arange(size))



# -- network -----------------------------------------------------------------------------------------------------

def test_cnn_layout_bias_corrected_dorefa_and_shared_bn_everywhere(synthetic):
    _, model = build(synthetic, (1, 2, 8), model="preact_resnet20", fp_shortcut=True)
    assert type(model.stem) is nn.Conv2d and type(model.fc) is nn.Linear
    block = model.blocks[3]
    assert isinstance(block.conv1, QuantConv2d) and isinstance(block.conv1.weight_quantizer, BiasCorrectedQuantizer)
    assert type(block.act1) is nn.ReLU and block.conv1.input_quantizer is not None  # quantized at the conv input
    assert block.shortcut[0].weight_quantizer is None  # full-precision shortcut weights, as Any-Precision's code
    _, default = build(synthetic, (1, 2, 8), model="preact_resnet20")
    assert isinstance(default.blocks[3].shortcut[0].weight_quantizer, BiasCorrectedQuantizer)
    assert isinstance(block.shortcut[1], SharedBatchNorm2d) and isinstance(model.final_norm, SharedBatchNorm2d)
    shared = [m for m in model.modules() if isinstance(m, SharedBatchNorm2d)]
    inside = {id(bn) for m in shared for bn in m.norms.values()}
    assert all(id(m) in inside for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # no BN left plain
    assert all(sorted(m.norms) == ["binary", "shared"] for m in shared)
    _, off = build(synthetic, (2, 8), bias_correction="off", shared_bn=False)
    assert off.blocks[0].conv1.weight_quantizer.__name__ == "dorefa_weight"
    assert all(sorted(m.norms) == ["2", "8"] for m in off.modules() if isinstance(m, SharedBatchNorm2d))


def test_shared_bn_grad_reaches_every_shared_bn_and_needs_a_shared_bn(synthetic):
    _, model = build(synthetic, (2, 4, 8), shared_bn_grad="mean")
    shared = [m for m in model.modules() if isinstance(m, SharedBatchNorm2d)]
    assert shared and all(m.grad == "mean" and m.trained_per_group == {"shared": 3} for m in shared)
    _, default = build(synthetic, (2, 4, 8))
    assert all(m.grad == "sum" for m in default.modules() if isinstance(m, SharedBatchNorm2d))
    with pytest.raises(ConfigError, match="shared_bn_grad=mean needs shared_bn=true"):
        EMQConfig(shared_bn=False, shared_bn_grad="mean")


def test_act_bits_fixes_the_activation_precision_below_32_bits(synthetic):
    _, model = build(synthetic, (2, 8, 32), act_bits=4)
    conv = model.blocks[0].conv2  # reads relu1's output through its input quantizer
    act = conv.input_quantizer
    x = torch.linspace(-0.5, 1.5, 41)
    for bits in (2, 8):
        assert torch.equal(act(x, bits), torch.round(x.clamp(0, 1) * 15) / 15)
    assert torch.equal(act(x, 32), torch.relu(x))


# Hand count of the pre-activation ResNet-20 (width 1: 16/32/64), 1 input channel, 10 classes, as in
# tests/methods/test_anyprecision.py: 267,264 quantized weights in 18 convs; full-precision stem, shortcuts and FC
# 3,354 values; BN channels 688 + 96 (EMQ turns the shortcut BNs into shared BNs too) = 784.
QUANT_WEIGHTS, QUANT_LAYERS, FP_VALUES, BN_CHANNELS = 267_264, 18, 3_354, 784
QUANT_OUTPUT_CHANNELS = 6 * 16 + 6 * 32 + 6 * 64  # output channels of the 18 quantized convs


@pytest.mark.parametrize("bias_correction, constants", [
    ("per_layer", 3 * QUANT_LAYERS),  # DoReFa's E, Eq. 2's scale and shift per layer
    ("per_channel", QUANT_LAYERS + 2 * QUANT_OUTPUT_CHANNELS),
    ("off", QUANT_LAYERS),  # DoReFa's E
])
def test_storage_equals_hand_count(synthetic, bias_correction, constants):
    bits = (1, 2, 4, 8, 32)
    method, model = build(synthetic, bits, model="preact_resnet20", width=1.0, bias_correction=bias_correction,
                          fp_shortcut=True)
    for b in bits:  # BN at any bit-width: gamma, beta, mean, var; at 32 bits the constants are in the weights
        stored_constants = constants if b < 32 else 0
        assert method.storage(model, b) * 8 == QUANT_WEIGHTS * b + (stored_constants + FP_VALUES + 4 * BN_CHANNELS) * 32
    # Latent 32-bit weights; gamma/beta once for the shared BN and once for the 1-bit BN; mean/var per bit-width.
    bn_values = (2 * 2 + 5 * 2) * BN_CHANNELS
    assert method.storage_total(model, bits) * 8 == (QUANT_WEIGHTS + FP_VALUES + bn_values) * 32


# -- training step -----------------------------------------------------------------------------------------------

def test_train_step_runs_each_bit_width_on_its_own_batch_in_descending_order(synthetic):
    method, model = build(synthetic, (2, 4, 8))
    model.train()
    per_bits = {2: batch_of(synthetic.train, range(0, 5)), 4: batch_of(synthetic.train, range(10, 16)),
                8: batch_of(synthetic.train, range(20, 27))}
    seen = []
    model.stem.register_forward_hook(lambda m, inputs, out: seen.append((model.blocks[0].conv1.bits,
                                                                         len(inputs[0]))))
    ctx = context(synthetic, (2, 4, 8))
    losses = method.train_step(model, Batch(per_bits[8].x, per_bits[8].y, per_bits[8].indices, per_bits), ctx)
    assert seen == [(8, 7), (4, 6), (2, 5)]
    assert ctx.passes == Counter({8: 7, 4: 6, 2: 5})
    with torch.no_grad():  # weights do not change inside a step, so the losses can be recomputed exactly
        for b, data in per_bits.items():
            method.set_bits(model, b)
            assert losses[f"loss_{b}"] == pytest.approx(F.cross_entropy(model(data.x), data.y).item(), rel=1e-6)


def test_recursive_distillation_teacher_is_the_higher_bit_width_on_the_students_batch(synthetic, monkeypatch):
    method, model = build(synthetic, (2, 8), distill="recursive")
    model.train()
    per_bits = {2: batch_of(synthetic.train, range(0, 6)), 8: batch_of(synthetic.train, range(30, 36))}
    teachers = []
    original = emq_module.soft_cross_entropy
    monkeypatch.setattr(emq_module, "soft_cross_entropy",
                        lambda logits, teacher: teachers.append(teacher.clone()) or original(logits, teacher))
    method.train_step(model, Batch(per_bits[8].x, per_bits[8].y, per_bits[8].indices, per_bits),
                      context(synthetic, (2, 8)))
    method.set_bits(model, 8)
    with torch.no_grad():
        expected = F.softmax(model(per_bits[2].x), dim=1)
    assert len(teachers) == 1 and torch.allclose(teachers[0], expected, atol=1e-6)


# -- coresets ----------------------------------------------------------------------------------------------------

def scored(synthetic, n=50, bits=(2, 8), seed=3, **options) -> EMQ:
    method = EMQ(EMQConfig(**options))
    method.seed, method.score_bits = seed, bits
    method.scores = torch.stack([torch.linspace(0, 1, n) * (i + 1) for i in range(len(bits))])
    return method


def test_coresets_per_bit_width_deterministic_and_redrawn_every_resample_epochs(synthetic):
    train = small_train(synthetic, 50)
    method = scored(synthetic, resample_every=2)
    first = method.epoch_indices(0, train, (2, 8))
    assert set(first) == {2, 8} and all(len(v) == 10 and len(torch.unique(v)) == 10 for v in first.values())
    assert not torch.equal(first[2], first[8])
    assert all(torch.equal(first[b], method.epoch_indices(1, train, (2, 8))[b]) for b in (2, 8))
    third = method.epoch_indices(2, train, (2, 8))
    assert not torch.equal(first[2], third[2])
    again = scored(synthetic, resample_every=2)  # same seed and scores: the same draws (exact resume)
    assert all(torch.equal(again.epoch_indices(2, train, (2, 8))[b], third[b]) for b in (2, 8))
    assert sorted(method.draws) == [0, 2]
    artifacts = method.artifacts()
    assert artifacts["coreset_epochs"].tolist() == [0, 2]
    assert torch.equal(artifacts["coreset_indices"][1, 0].long(), third[2])
    assert torch.equal(artifacts["tdds_scores"], method.scores)
    torch.testing.assert_close(artifacts["sampling_probabilities"].sum(dim=1), torch.ones(2))


def test_state_dict_round_trip_keeps_scores_and_draws(synthetic):
    method = scored(synthetic)
    method.epoch_indices(0, small_train(synthetic, 50), (2, 8))
    restored = EMQ(EMQConfig())
    restored.load_state_dict(method.state_dict())
    assert restored.seed == 3 and restored.score_bits == (2, 8) and torch.equal(restored.scores, method.scores)
    assert torch.equal(restored.draws[0], method.draws[0])


def test_resumed_run_reuses_scores_and_equals_the_uninterrupted_run(tiny_spec, synthetic, tmp_path, monkeypatch):
    spec = tiny_spec(methods=("emq:score_epochs=3",), bits=(2, 8), epochs=3)
    label = "emq:score_epochs=3"
    data = dataclasses.replace(synthetic, train=small_train(synthetic, 96))
    full_store, resumed_store = RunStore(tmp_path / "full"), RunStore(tmp_path / "resumed")
    full = run_cell(spec, label, 0, data, full_store)
    partial = run_cell(spec, label, 0, data, resumed_store, stop_after=1)
    assert partial.record is None

    def no_rescoring(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the saved scores")

    monkeypatch.setattr(EMQ, "scoring_run", no_rescoring)
    resumed = run_cell(spec, label, 0, data, resumed_store)
    assert resumed.record["results"] == full.record["results"]
    assert resumed.record["sample_passes_total"] == full.record["sample_passes_total"]
    # scoring 3 epochs x 96 samples per bit-width + 3 epochs x round(0.2 x 96) = 19 coreset samples
    assert full.record["results"]["2"]["sample_passes"] == 3 * 96 + 3 * 19
    saved = [torch.load(s.cell_dir(label, 0) / "artifacts.pt") for s in (full_store, resumed_store)]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    assert saved[0]["tdds_scores"].shape == (2, 96) and saved[0]["coreset_indices"].shape == (3, 2, 19)


# -- BN adaptation and unseen bit-widths -------------------------------------------------------------------------

def test_finalize_adapts_bn_per_bit_width_without_changing_weights_and_serves_untrained_bits(synthetic):
    method, model = build(synthetic, (2, 4, 8), bn_adapt_batches=2)
    method.check_eval_bits((2, 4, 8), (2, 3, 4, 8))
    model.train()
    method.train_step(model, batch_of(synthetic.train, range(32)), context(synthetic, (2, 4, 8)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = iter([batch_of(synthetic.train, range(i, i + 16)) for i in (0, 16, 32)])
    method.finalize(model, batches, context(synthetic, (2, 4, 8), eval_bits=(2, 3, 4, 8)))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if ".adapted" not in k)
    assert next(batches).indices[0].item() == 32  # exactly bn_adapt_batches were read
    for bn in (m for m in model.modules() if isinstance(m, SharedBatchNorm2d)):
        assert bn.adapted.nonzero().flatten().tolist() == [1, 2, 3, 7]

    model.eval()
    x = synthetic.test.get_batch(torch.arange(16))
    outputs = {}
    with torch.no_grad():
        for b in (2, 3, 4, 8):
            method.set_bits(model, b)
            outputs[b] = model(x)
    assert all(torch.isfinite(o).all() for o in outputs.values())
    assert not torch.equal(outputs[3], outputs[2]) and not torch.equal(outputs[3], outputs[4])
    # eval at 3 bits normalizes with the statistics adapted at 3 bits
    bn = model.blocks[0].bn1
    assert not torch.equal(bn.adapted_mean[2], bn.adapted_mean[3])


def test_check_eval_bits_allows_untrained_bits_only_with_shared_bn_and_adaptation():
    EMQ().check_eval_bits((2, 4, 8), (2, 3, 5, 6, 8))
    with pytest.raises(ConfigError, match="shared_bn=on"):
        EMQ(EMQConfig(shared_bn=False)).check_eval_bits((2, 4), (3,))
    with pytest.raises(ConfigError, match="bn_adapt_batches"):
        EMQ(EMQConfig(bn_adapt_batches=0)).check_eval_bits((2, 4), (3,))
    with pytest.raises(ConfigError, match="1 bit has its own BN"):
        EMQ().check_eval_bits((2, 4), (1, 2))
    EMQ(EMQConfig(share_binary_bn=True)).check_eval_bits((2, 4), (1, 2))


# -- ViT ---------------------------------------------------------------------------------------------------------

def test_vit_layout_statsq_weights_and_lsq_inputs_on_every_linear_but_the_head(synthetic):
    _, model = build(synthetic, (2, 8), model="deit_tiny", width=0.1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    quantized = [m for m in linears if isinstance(m, QuantLinear)]
    assert len(linears) == 49 and len(quantized) == 48  # 12 blocks x (qkv, proj, fc1, fc2) + the head
    assert type(model.vit.head) is nn.Linear and type(model.vit.patch_embed.proj) is nn.Conv2d
    assert all(isinstance(m.input_quantizer, LSQActivation) for m in quantized)
    assert all(m.weight_quantizer.quantizer.__name__ == "statsq_weight" for m in quantized)
    with pytest.raises(ConfigError, match="no 1-bit form"):
        build(synthetic, (1, 8), model="deit_tiny", width=0.1)


@pytest.mark.parametrize("model_name, width", [("deit_tiny", 0.1), ("deit_micro", 0.2)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_vit_quantized_linears_hold_at_most_two_to_the_b_values(synthetic, model_name, width, bits):
    """StatsQ weights: at most 2^b distinct values per output row (bias correction is one affine map per layer);
    LSQ inputs: at most 2^b distinct values per tensor (one step per layer); stem and head as declared."""
    from harness.topology import declare_topology

    method, model = build(synthetic, (bits, 8), model=model_name, width=width)
    quantized_inputs: dict[str, torch.Tensor] = {}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in linears.items():
        layer.input_quantizer.register_forward_hook(
            lambda module, inputs, output, name=name: quantized_inputs.__setitem__(name, output.detach()))
    model.train()
    method.set_bits(model, bits)
    model(synthetic.train.get_batch(torch.arange(16)))  # initializes the LSQ steps at ``bits``
    assert len(quantized_inputs) == len(linears) > 0
    for name, layer in linears.items():
        weight = layer.quantized_weight().detach()
        assert max(len(torch.unique(row)) for row in weight) <= 2**bits, name
        assert len(torch.unique(quantized_inputs[name])) <= 2**bits, name
    topology = declare_topology(model, model_name)
    head, stem = topology.site("vit.head"), topology.site("vit.patch_embed.proj")
    assert not (head.quantize_weight or head.quantize_input or stem.quantize_weight or stem.quantize_input)
    assert type(model.vit.head) is nn.Linear and type(model.vit.patch_embed.proj) is nn.Conv2d
    assert set(topology.weight_sites) == set(linears) == set(topology.input_sites)


def test_quant_linear_storage_hand_count():
    layer = QuantLinear(3, 4, weight_quantizer=lambda w, b: w, input_quantizer=LSQActivation(), scales_per_layer=8)
    # 12 codes at 2 bits + 8 constants (scale and offset per row) + 4 biases + 1 LSQ step, 32 bits each
    assert layer.storage_bits(2) == 12 * 2 + (8 + 4 + 1) * 32
    assert layer.storage_bits(32) == 12 * 32 + 4 * 32
    assert layer.storage_bits_total((2, 4, 8)) == 12 * 32 + 4 * 32 + 3 * 32  # latent weights, a step per bits


def test_vit_trains_initializes_lsq_steps_and_calibrates_an_untrained_bit_width(synthetic):
    method, model = build(synthetic, (2, 8), model="deit_tiny", width=0.1, bn_adapt_batches=1)
    first = model.vit.blocks[0].attn.qkv
    seen = {}

    def record_input(module, inputs, output) -> None:  # returns None: a hook's return value replaces the output
        seen.setdefault(module.bits, inputs[0].detach().clone())

    first.input_quantizer.register_forward_hook(record_input)
    model.train()
    ctx = context(synthetic, (2, 8))
    losses = method.train_step(model, batch_of(synthetic.train, range(8)), ctx)
    assert set(losses) == {"loss_2", "loss_8"} and all(math.isfinite(v) for v in losses.values())
    assert first.input_quantizer.steps[7].item() == pytest.approx(2 * seen[8].abs().mean().item() / math.sqrt(127))
    assert first.input_quantizer.steps[1].item() == pytest.approx(2 * seen[2].abs().mean().item() / math.sqrt(1))
    assert first.weight.grad is not None and first.input_quantizer.steps.grad[7] != 0

    x = synthetic.test.get_batch(torch.arange(4))
    model.eval()
    method.set_bits(model, 3)
    with pytest.raises(ConfigError, match="never trained or calibrated"):
        model(x)
    method.finalize(model, iter([batch_of(synthetic.train, range(16))]), context(synthetic, (2, 8),
                                                                                 eval_bits=(2, 3, 8)))
    assert bool(first.input_quantizer.initialized[2]) and not model.training
    with torch.no_grad():
        method.set_bits(model, 3)
        three = model(x)
        method.set_bits(model, 2)
        two = model(x)
    assert torch.isfinite(three).all() and not torch.equal(three, two)
