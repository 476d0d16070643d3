"""One training step per registered method (ResNet-20, batch 128, bits 2,4,8) against full-precision steps.

The figure of merit is ``method step / (k x full-precision step)``, k = number of bit-widths run per step
(goals: 1.15 for anyprecision, dedicated and emq, 1.3 for adabits, 2.7 for mbquant, whose seven 2-bit branches
are 7/3 of the work by design); each method's ratio goes to ``extra_info`` (the full-precision step is
re-timed before and after the method in the same test, the faster median kept, so the ratio does not depend on
test order). ``interleaved_ratio`` in ``extra_info`` is the steadier figure on a machine whose speed drifts: the
median over rounds of one method step over k full-precision steps timed just before it.

``test_method_step_parts`` times each method's step with its weight and/or input quantizers replaced by the identity
(``quantizer_parts.py``): how much of the step each part costs, and the floor without them; and with every
quantizer replaced by a one-pass stand-in (a product by 1.0): the floor of any quantizer that writes a new tensor
(select with ``-k parts``).

``test_method_step_compiled`` is the same step with both networks compiled as ``--compile`` compiles them
(``Runtime.prepare_model``: fresh dynamo caches per network), its ratio taken against a compiled full-precision
step; compiling costs 15-150 s per cell on 2 CPU cores, so select it on its own (``-k compiled``) or leave it out
(``-k "not compiled"``).

Each timed step ends with the version bump an optimizer step makes (``harness.optim.step_optimizers``), so the
quantizers' per-version cache (:mod:`methods.quant.version_cache`) costs and saves what it does in training.
"""

import time

import pytest
import torch
import torch.nn.functional as F

from harness.data import DatasetInfo
from harness.method import Batch, RunContext
from harness.models import create_model
from harness.registry import get_method, list_methods
from harness.runtime import Runtime

BITS = (2, 4, 8)
SIZES = {"8x8": 8, "32x32": 32}


def info(size: int) -> DatasetInfo:
    return DatasetInfo("bench", 10, 3, size, (0.5,) * 3, (0.25,) * 3, "none")


def batch(size: int) -> Batch:
    torch.manual_seed(0)
    return Batch(torch.rand(128, 3, size, size), torch.randint(0, 10, (128,)), torch.arange(128))


@pytest.mark.parametrize("size", sorted(SIZES))
def test_full_precision_step(benchmark, size):
    model = create_model("resnet20", num_classes=10, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    data = batch(SIZES[size])

    def step():
        model.zero_grad()
        F.cross_entropy(model(data.x), data.y).backward()

    benchmark(step)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name", list_methods())
def test_method_step(benchmark, name, size):
    _benchmark_method_step(benchmark, name, size, compiled=False)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name", list_methods())
def test_method_step_compiled(benchmark, name, size):
    _benchmark_method_step(benchmark, name, size, compiled=True)


def _benchmark_method_step(benchmark, name: str, size: str, compiled: bool, prepare=None) -> None:
    """``prepare(model)``, if given, changes the built network before it is timed (``test_method_step_parts``)."""
    method = get_method(name)()
    model = method.build("resnet20", 10, BITS, info(SIZES[size]), 1.0)
    model.train()
    if prepare is not None:
        prepare(model)
    model = Runtime(torch.device("cpu"), compile=compiled).prepare_model(model)  # as --compile does, or as is
    ctx = RunContext(bits=BITS, device=torch.device("cpu"), num_classes=10, seed=0, epochs=1)
    data = batch(SIZES[size])

    params = list(model.parameters())

    def step():
        model.zero_grad()
        method.train_step(model, data, ctx)
        # what an optimizer step does to the weights' versions: the quantizers' per-version terms are recomputed
        # once per step, as in training (without it they would be computed once for the whole benchmark)
        torch.autograd.graph.increment_version(params)

    if compiled:
        start = time.perf_counter()
        step()  # compiles one graph per bit-width
        benchmark.extra_info["first_step_s"] = round(time.perf_counter() - start, 2)
    # the full-precision step is timed before and after the method's and the faster median kept: on a shared or
    # throttling machine one short timing moved the ratio by up to 20 %, and the faster reference errs on the
    # side of a higher (worse) ratio
    fp_before = full_precision_step_seconds(data, compiled=compiled)
    benchmark(step)
    fp_seconds = min(fp_before, full_precision_step_seconds(data, compiled=compiled))
    benchmark.extra_info["bit_widths_per_step"] = len(BITS)
    benchmark.extra_info["full_precision_step_s"] = round(fp_seconds, 5)
    if benchmark.stats:  # None under --benchmark-disable, which runs the step once, untimed
        benchmark.extra_info["ratio_to_k_fp_steps"] = round(benchmark.stats.stats.median / (len(BITS) * fp_seconds),
                                                            3)
        benchmark.extra_info["interleaved_ratio"] = interleaved_ratio(step, data, compiled=compiled)


QUANTIZER_PARTS = {"without weight quantizers": ("weight",), "without input quantizers": ("input",),
                   "without either": ("weight", "input"), "one-pass quantizers": ()}


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("parts", sorted(QUANTIZER_PARTS))
@pytest.mark.parametrize("name", list_methods())
def test_method_step_parts(benchmark, name, parts, size):
    """Where a method's step time goes: the same step with the weight quantizers, the input quantizers or both
    replaced by the identity in every quantized layer (``quantizer_parts.remove_quantizers``; switchable BN,
    MBQuant's branches, distillation and the harness stay), or with every quantizer a product by 1.0
    (``quantizer_parts.one_pass_quantizers``). A diagnostic, not a method: its ratio is the floor the quantizers'
    removal would reach, or that of quantizers costing one elementwise pass each way."""
    from quantizer_parts import one_pass_quantizers, remove_quantizers

    def prepare(model):
        removed = QUANTIZER_PARTS[parts]
        if not (remove_quantizers(model, removed) if removed else one_pass_quantizers(model)):
            pytest.skip(f"{name} has no quantizers")

    _benchmark_method_step(benchmark, name, size, compiled=False, prepare=prepare)


def interleaved_ratio(method_step, data: Batch, rounds: int = 7, compiled: bool = False) -> float:
    """Median over ``rounds`` of (one method step) / (k full-precision steps timed right before it).

    A virtual machine's speed drifts by 10 % or more within minutes, and the benchmark's own figure divides a median
    taken over one stretch of time by one taken over another; here each round's two timings are seconds apart, so
    the drift cancels."""
    model = create_model("resnet20", num_classes=10, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = Runtime(torch.device("cpu"), compile=compiled).prepare_model(model)

    def fp_step():
        model.zero_grad()
        F.cross_entropy(model(data.x), data.y).backward()

    fp_step()  # warm-up (and compilation)
    ratios = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in BITS:
            fp_step()
        middle = time.perf_counter()
        method_step()
        ratios.append((time.perf_counter() - middle) / (middle - start))
    return round(sorted(ratios)[rounds // 2], 3)


def alternating_medians(first, second, rounds: int) -> tuple[float, float, float]:
    """``first()`` and ``second()`` timed in alternation for ``rounds`` rounds: the median over rounds of second's
    time over first's timed right before it (a machine's speed drift cancels), and each one's median seconds."""
    ratios, first_times, second_times = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        first()
        middle = time.perf_counter()
        second()
        end = time.perf_counter()
        ratios.append((end - middle) / (middle - start))
        first_times.append(middle - start)
        second_times.append(end - middle)
    return tuple(sorted(values)[rounds // 2] for values in (ratios, first_times, second_times))


def full_precision_step_seconds(data: Batch, repeats: int = 9, compiled: bool = False) -> float:
    """Median seconds of one full-precision ResNet-20 step on ``data`` (after one warm-up step, which compiles)."""
    model = create_model("resnet20", num_classes=10, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = Runtime(torch.device("cpu"), compile=compiled).prepare_model(model)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model.zero_grad()
        F.cross_entropy(model(data.x), data.y).backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]
