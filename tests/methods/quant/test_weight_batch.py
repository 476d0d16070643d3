"""One autograd node for all of a network's DoReFa weights: the per-layer path's bits, taken only by the forward pass
it was made for, skipped where no gradient is taken, and safe under copies."""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.quant import weight_batch
from methods.quant.bias_correction import BiasCorrectedQuantizer
from methods.quant.dorefa import DOREFA_TERMS, _DoReFaTerms, _DoReFaWeight, dorefa_weight
from methods.quant.modules import QuantConv2d
from methods.quant.sat import SAT_TERMS, SATStoredWeights, _SATTerms, sat_weight
from methods.quant.sat_layers import SATConv2d
from methods.quant.version_cache import version_cache_disabled
from tests.methods.quant.test_version_cache import assert_same_states, same_bits, train_two_steps, two_step_setup

SHAPES = [(16, 8, 3, 3), (8, 8, 1, 1), (4, 16, 3, 3)]


def latent_weights(seed: int = 0) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    weights = [torch.randn(shape) * 0.2 for shape in SHAPES]
    flat = weights[0].view(-1)
    flat[1] = -flat.abs().max()  # a tie at the max, as in the per-layer tests
    flat[0] = -flat[1]
    return [nn.Parameter(w) for w in weights]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 32])
def test_batched_node_gives_each_layer_the_single_layer_nodes_bits_forward_and_backward(bits):
    upstream = [torch.randn(shape) for shape in SHAPES]
    upstream[1].view(-1)[3] = -0.0  # a signed zero upstream stays one
    batched_weights, single_weights, uncached_weights = latent_weights(), latent_weights(), latent_weights()
    terms = [_DoReFaTerms(w) for w in batched_weights]
    outputs = weight_batch.BatchedTermsNode.apply(terms, (bits,), *batched_weights)
    torch.autograd.backward(outputs, upstream)
    for i, grad in enumerate(upstream):
        single = dorefa_weight(single_weights[i], bits)
        single.backward(grad)
        uncached = _DoReFaWeight.apply(uncached_weights[i], bits)
        uncached.backward(grad)
        assert same_bits(outputs[i].detach(), single.detach()) and same_bits(single.detach(), uncached.detach())
        assert same_bits(batched_weights[i].grad, single_weights[i].grad)
        assert same_bits(single_weights[i].grad, uncached_weights[i].grad)


def test_a_layer_without_upstream_gradient_gets_none_and_the_others_theirs():
    weights = latent_weights()
    outputs = weight_batch.BatchedTermsNode.apply([_DoReFaTerms(w) for w in weights], (4,), *weights)
    (outputs[0].sum() + outputs[2].sum()).backward()
    assert weights[0].grad is not None and weights[2].grad is not None and weights[1].grad is None
    alone = latent_weights()[2]
    dorefa_weight(alone, 4).sum().backward()
    assert same_bits(weights[2].grad, alone.grad)


class TwoPaths(nn.Module):
    """Three DoReFa layers, a full-precision one and a BN: ``forward`` runs ``conv_a``, ``conv_b`` and ``plain``;
    ``spare`` never."""

    def __init__(self, quantizer=dorefa_weight) -> None:
        super().__init__()
        self.conv_a = QuantConv2d(3, 8, 3, padding=1, weight_quantizer=quantizer, bits=4)
        self.conv_b = QuantConv2d(8, 8, 3, padding=1, weight_quantizer=quantizer, bits=4)
        self.spare = QuantConv2d(8, 8, 1, weight_quantizer=quantizer, bits=4)
        self.plain = QuantConv2d(8, 8, 1, weight_quantizer=None, bits=4)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.plain(self.conv_b(F.relu(self.norm(self.conv_a(x)))))


def count_taken(monkeypatch) -> list[bool]:
    taken = []
    real = weight_batch.take_batched

    def spy(weight, name, *args):
        result = real(weight, name, *args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(weight_batch, "take_batched", spy)  # DoReFa's and SAT's, through quantize_batched_or_cached
    monkeypatch.setattr("methods.quant.bias_correction.take_batched", spy)
    return taken


def batched_and_per_layer_gradients(network: nn.Module, x: torch.Tensor, taken: list[bool]) -> nn.Module:
    """One training pass of ``network`` with its weights batched, and one of a copy on the per-layer uncached path;
    asserts that every parameter's gradient is the same bits (or None in both); returns the batched network."""
    model = weight_batch.batch_weights(network)
    reference = copy.deepcopy(model)
    model(x).square().sum().backward()
    batched_taken = list(taken)
    with version_cache_disabled():
        reference(x).square().sum().backward()
    assert not any(taken[len(batched_taken):])
    taken[:] = batched_taken
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None and q.grad is None) or same_bits(p.grad, q.grad), name
    return model


def test_training_forward_takes_every_layers_batched_weight_and_drops_the_rest(monkeypatch):
    taken = count_taken(monkeypatch)
    torch.manual_seed(0)
    model = batched_and_per_layer_gradients(TwoPaths(), torch.randn(4, 3, 6, 6), taken)
    assert taken == [True, True]
    assert not weight_batch._waiting  # the unused layer's weight was dropped after the pass
    assert model.spare.weight.grad is None and model.plain.weight.grad is not None


@pytest.mark.parametrize("context", ["eval", "no_grad", "cache off", "inference"])
def test_nothing_is_batched_where_no_gradient_is_taken_or_the_cache_is_off(context, monkeypatch):
    taken = count_taken(monkeypatch)
    model = weight_batch.batch_weights(TwoPaths())
    x = torch.randn(2, 3, 6, 6)
    if context == "eval":
        model.eval()
    scope = {"no_grad": torch.no_grad, "cache off": version_cache_disabled,
             "inference": torch.inference_mode}.get(context, contextlib.nullcontext)
    with scope():
        model(x)
    assert not any(taken) and not weight_batch._waiting


def test_a_waiting_weight_is_taken_only_at_its_bit_width_version_and_with_gradient():
    weight = latent_weights()[0]
    quantized = weight_batch.BatchedTermsNode.apply([_DoReFaTerms(weight)], (4,), weight)[0]

    def wait(bits=4):
        weight_batch._waiting[weight] = (DOREFA_TERMS, (bits,), weight_batch._version_key(weight), quantized)

    wait()
    assert weight_batch.take_batched(weight, DOREFA_TERMS, 2) is None  # another bit-width: left waiting
    assert weight_batch.take_batched(weight, "other_quantizer", 4) is None
    with torch.no_grad():
        assert weight_batch.take_batched(weight, DOREFA_TERMS, 4) is None  # e.g. EMQ's reference statistics
    assert weight_batch.take_batched(weight, DOREFA_TERMS, 4) is quantized
    assert weight_batch.take_batched(weight, DOREFA_TERMS, 4) is None  # taken once
    wait()
    with torch.no_grad():
        weight.add_(1.0)  # a new version: the waiting value is stale
    assert weight_batch.take_batched(weight, DOREFA_TERMS, 4) is None and not weight_batch._waiting


def test_copies_and_pickles_batch_their_own_layers(monkeypatch):
    taken = count_taken(monkeypatch)
    torch.manual_seed(0)
    model = weight_batch.batch_weights(TwoPaths())
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 6, 6)
    for copy_ in (clone, restored):
        taken.clear()
        copy_(x).sum().backward()
        assert taken == [True, True] and copy_.conv_a.weight.grad is not None
    assert model.conv_a.weight.grad is None  # the copies' passes did not reach the original's weights
    model(x).sum().backward()
    assert same_bits(model.conv_a.weight.grad, clone.conv_a.weight.grad)


def test_batch_terms_cover_dorefa_alone_and_under_bias_correction_and_nothing_else():
    weight = latent_weights()[0]
    name, terms, args = weight_batch.batch_terms(dorefa_weight, weight, 4)
    assert name == DOREFA_TERMS and isinstance(terms, _DoReFaTerms) and args == (4,)
    corrected = BiasCorrectedQuantizer(dorefa_weight, "per_channel")
    name, wrapped, _ = weight_batch.batch_terms(corrected, weight, 4)
    assert name == ("bias_corrected", dorefa_weight, "per_channel") and wrapped.base is terms  # the cached terms
    assert weight_batch.batch_terms(corrected, weight, 32)[0] == DOREFA_TERMS  # no correction at 32 bits
    assert weight_batch.batch_terms(BiasCorrectedQuantizer(sat_weight), weight, 4) is None
    assert weight_batch.batch_terms(sat_weight, weight, 4) is None


@pytest.mark.parametrize("granularity", ["per_layer", "per_channel"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_bias_corrected_batch_gives_the_per_layer_bits_forward_and_backward(granularity, bits):
    quantizer = BiasCorrectedQuantizer(dorefa_weight, granularity)
    upstream = [torch.randn(shape) for shape in SHAPES]
    batched_weights, single_weights = latent_weights(), latent_weights()
    found = [weight_batch.batch_terms(quantizer, w, bits) for w in batched_weights]
    outputs = weight_batch.BatchedTermsNode.apply([terms for _, terms, _ in found], (bits,), *batched_weights)
    torch.autograd.backward(outputs, upstream)
    for i, grad in enumerate(upstream):
        with version_cache_disabled():
            single = quantizer(single_weights[i], bits)
        single.backward(grad)
        assert same_bits(outputs[i].detach(), single.detach())
        assert same_bits(batched_weights[i].grad, single_weights[i].grad)


def remove_batching_hooks(model: nn.Module) -> None:
    removed, ours = 0, (weight_batch._quantize_together, weight_batch._drop_untaken)
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if getattr(hook, "func", hook) in ours]:
                del hooks[key]
                removed += 1
    assert removed >= 2


@pytest.mark.parametrize("name", ["anyprecision", "dedicated", "emq", "adabits"])
def test_methods_train_the_same_bits_with_and_without_the_batch(name, monkeypatch):
    taken = count_taken(monkeypatch)
    bits = (2, 4, 8) if name == "emq" else (2, 4, 8, 32)
    method, initial, batches, ctx = two_step_setup(name, bits)
    batched = train_two_steps(method, copy.deepcopy(initial), batches, ctx)
    assert taken.count(True) >= 2 * len(bits)  # every step's forward passes took batched weights
    taken.clear()
    per_layer = copy.deepcopy(initial)  # the per-layer cached path: the same network without the batching hooks
    remove_batching_hooks(per_layer)
    assert_same_states(batched, train_two_steps(method, per_layer, batches, ctx))
    assert taken and not any(taken)


class Raises(TwoPaths):
    def forward(self, x):
        self.conv_a(x)
        raise RuntimeError("a fault mid-pass")


def test_a_forward_pass_that_raises_leaves_nothing_waiting():
    model = weight_batch.batch_weights(Raises())
    with pytest.raises(RuntimeError, match="mid-pass"):
        model(torch.randn(2, 3, 6, 6))
    assert not weight_batch._waiting


class Repeats(nn.Module):
    """One layer called twice, a second layer sharing the first's weight, and a layer at another bit-width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = QuantConv2d(4, 4, 3, padding=1, weight_quantizer=dorefa_weight, bits=4)
        self.shared = QuantConv2d(4, 4, 3, padding=1, weight_quantizer=dorefa_weight, bits=4)
        self.shared.weight = self.conv.weight
        self.other = QuantConv2d(4, 4, 1, weight_quantizer=dorefa_weight, bits=2)

    def forward(self, x):
        return self.other(self.shared(self.conv(self.conv(x))))


def test_repeated_and_shared_weights_and_mixed_bit_widths_train_as_per_layer(monkeypatch):
    taken = count_taken(monkeypatch)
    torch.manual_seed(0)
    batched_and_per_layer_gradients(Repeats(), torch.randn(2, 4, 5, 5), taken)
    assert taken == [True, False, False, True]  # the first use of each weight; the others compute their own


def test_the_backward_pass_skips_frozen_weights(monkeypatch):
    sizes = []
    backward_many = _DoReFaTerms.backward_many

    def spy(terms, grads, bits):
        sizes.append([t.normalized.shape for t in terms])
        return backward_many(terms, grads, bits)

    monkeypatch.setattr(_DoReFaTerms, "backward_many", staticmethod(spy))
    weights = latent_weights()
    weights[1].requires_grad_(False)
    outputs = weight_batch.BatchedTermsNode.apply([_DoReFaTerms(w) for w in weights], (4,), *weights)
    sum(o.sum() for o in outputs).backward()
    assert sizes == [[weights[0].shape, weights[2].shape]]  # the frozen layer's gradient is not computed
    assert weights[1].grad is None and weights[0].grad is not None


def test_a_compiled_network_traces_without_graph_breaks():
    torch._dynamo.reset()
    model = weight_batch.batch_weights(TwoPaths())
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 6, 6))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("scheme", ["original", "centered"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 32])
def test_sat_batch_gives_the_single_layer_and_composed_bits_forward_and_backward(bits, scheme):
    upstream = [torch.randn(shape) for shape in SHAPES]
    upstream[2].view(-1)[5] = float("inf")  # a non-finite upstream stays where it was
    batched_weights, single_weights, composed_weights = latent_weights(), latent_weights(), latent_weights()
    outputs = weight_batch.BatchedTermsNode.apply([_SATTerms(w) for w in batched_weights], (bits, scheme),
                                                  *batched_weights)
    torch.autograd.backward(outputs, upstream)
    for i, grad in enumerate(upstream):
        single = sat_weight(single_weights[i], bits, scheme)
        single.backward(grad)
        with version_cache_disabled():  # the composed formula
            composed = sat_weight(composed_weights[i], bits, scheme)
        composed.backward(grad)
        assert same_bits(outputs[i].detach(), single.detach()) and same_bits(single.detach(), composed.detach())
        assert same_bits(batched_weights[i].grad, single_weights[i].grad)
        assert same_bits(single_weights[i].grad, composed_weights[i].grad)


def test_sat_layers_answer_their_own_weight_precision_and_scheme_and_exported_ones_nothing():
    layer = SATConv2d(4, 4, 3, bits_set=(2, 4, 8), weight_bits_rule="max8", weight_scheme="centered")
    layer.set_bits(2)
    name, terms, args = layer.batch_terms()
    assert name == SAT_TERMS and isinstance(terms, _SATTerms) and args == (8, "centered")
    layer.stored_weights = SATStoredWeights(torch.zeros(4, 4, 3, 3, dtype=torch.long), 8, "centered")
    assert layer.batch_terms() is None


def test_the_layer_list_is_kept_until_a_module_is_registered(monkeypatch):
    """A network's layers are walked once, not at every training forward pass; a submodule registered anywhere
    (here a replaced layer) makes the next pass walk them again, and the new layer's weight is batched."""
    taken = count_taken(monkeypatch)
    model = weight_batch.batch_weights(TwoPaths())
    x = torch.randn(2, 3, 6, 6)
    model(x)
    walks = []
    real_modules = nn.Module.modules
    monkeypatch.setattr(nn.Module, "modules", lambda self: walks.append(self) or real_modules(self))
    model(x)
    assert model not in walks  # the kept list served
    model.conv_b = QuantConv2d(8, 8, 3, padding=1, weight_quantizer=dorefa_weight, bits=4)
    taken.clear()
    model(x)
    assert model in walks and taken == [True, True]  # walked again; the new conv_b took its batched weight
    assert model.conv_b in weight_batch._weight_layers(model)
