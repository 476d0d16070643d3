"""The GPU fast path's pieces, checked on the CPU (and on CUDA when present): data held on the device, on-device
augmentation, bf16 autocast, channels_last, torch.compile and the phase timer."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binomtest, chisquare
from torch import nn

from harness.config import RunSpec
from harness.cost import PhaseTimer
from harness.data import DataBundle, TensorImageSet, dataset_info, load_dataset
from harness.errors import ConfigError
from harness.loader import derived_generator
from harness.runtime import Runtime, needs_onednn_off, place_data
from harness.train import run_cell
from tests.fixtures import write_dataset

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def uint8_set(count: int = 512, size: int = 16, seed: int = 0) -> TensorImageSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (count, 1, size, size), dtype=torch.uint8, generator=generator)
    return TensorImageSet(images, torch.arange(count) % 10, augment="crop_flip")


def test_device_copy_gives_the_host_batches_exactly():
    host = uint8_set()
    held = host.on_device(torch.device("cpu"))
    assert held is not host and held.images.device.type == "cpu"
    indices = torch.randperm(len(host), generator=torch.Generator().manual_seed(1))[:64]
    for augment in (False, True):
        a = host.get_batch(indices, augment, derived_generator(0, 0, 1))
        b = held.get_batch(indices, augment, derived_generator(0, 0, 1))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_on_device_augmentation_matches_the_cpu_distribution(device):
    """Shapes, value range, flip rate and crop-offset distribution of the on-device crop+flip."""
    count, size, padding = 4000, 12, 4
    # Each image is its column index + 1 (as uint8), so a flip and the horizontal offset can be read off the pixels.
    columns = (torch.arange(size) + 1).to(torch.uint8).expand(count, 1, size, size).contiguous()
    host = TensorImageSet(columns, torch.zeros(count, dtype=torch.long), augment="crop_flip")
    held = host.on_device(torch.device(device))
    batch = held.get_batch(torch.arange(count), True, derived_generator(3, 0, 1))
    assert batch.device.type == device and batch.shape == (count, 1, size, size) and batch.dtype == torch.float32
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
    reference = host.get_batch(torch.arange(count), True, derived_generator(3, 0, 1))
    torch.testing.assert_close(batch.cpu(), reference, rtol=0, atol=0)  # the same draws give the same pixels
    middle = (batch[:, 0, size // 2] * 255).round().long().cpu()  # one row: zero padding or column + 1
    inside = middle > 0
    steps = torch.where(inside[:, 1:] & inside[:, :-1], middle[:, 1:] - middle[:, :-1], torch.zeros_like(middle[:, 1:]))
    flipped = (steps < 0).any(dim=1)
    assert binomtest(int(flipped.sum()), count, 0.5).pvalue > 1e-3
    # Horizontal offset in the padded image: the first column shows original column (left - padding) + 1.
    first_visible = torch.argmax(inside.long(), dim=1)
    first_value = middle[torch.arange(count), first_visible]
    unflipped = ~flipped
    left = (first_value[unflipped] - 1) + padding - first_visible[unflipped]
    observed = torch.bincount(left, minlength=2 * padding + 1)
    assert observed.numel() == 2 * padding + 1
    assert chisquare(observed.numpy()).pvalue > 1e-3  # uniform over 0..2p


def test_place_data_keeps_the_host_path_on_cpu_and_moves_on_request(synthetic):
    assert place_data(synthetic, torch.device("cpu"), "auto") is synthetic
    assert place_data(synthetic, torch.device("cpu"), "host") is synthetic
    moved = place_data(synthetic, torch.device("cpu"), "device")
    assert isinstance(moved.train, TensorImageSet) and moved.train is not synthetic.train
    torch.testing.assert_close(moved.train.get_batch(torch.arange(8)), synthetic.train.get_batch(torch.arange(8)),
                               rtol=0, atol=0)


def test_subset_is_materialized_on_the_device():
    data = load_dataset("synthetic", train_subset=40, seed=0)
    moved = place_data(data, torch.device("cpu"), "device")
    assert len(moved.train) == 40
    torch.testing.assert_close(moved.train.get_batch(torch.arange(40)), data.train.get_batch(torch.arange(40)),
                               rtol=0, atol=0)
    assert torch.equal(moved.train.labels, data.train.labels)


def test_folder_sets_refuse_device_placement(tmp_path):
    root = write_dataset(tmp_path, "imagenet")
    data = load_dataset("imagenet", root)
    assert place_data(data, torch.device("cpu"), "auto") is data
    with pytest.raises(ConfigError, match="cannot be held on the device"):
        place_data(data, torch.device("cpu"), "device")


def test_bf16_autocast_runs_convolutions_in_bfloat16():
    runtime = Runtime(torch.device("cpu"), amp="bf16")
    conv = nn.Conv2d(1, 4, 3)
    with runtime.autocast():
        out = conv(torch.rand(2, 1, 8, 8))
    assert out.dtype == torch.bfloat16
    with Runtime(torch.device("cpu")).autocast():
        assert conv(torch.rand(2, 1, 8, 8)).dtype == torch.float32


def test_channels_last_model_and_inputs():
    runtime = Runtime(torch.device("cpu"), channels_last=True)
    model = runtime.prepare_model(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = runtime.prepare_input(torch.rand(2, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_compile_keeps_state_dict_keys_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    keys = list(model.state_dict())
    x = torch.rand(5, 4)
    expected = model(x)
    compiled = Runtime(torch.device("cpu"), compile=True).prepare_model(model)
    assert list(compiled.state_dict()) == keys
    torch.testing.assert_close(compiled(x), expected)


class _Scaled(nn.Module):
    """Output ``x + bits``, plus 1 where it ran compiled: tells a compiled graph from an eager fallback. The loop
    over ``bits`` makes each value its own graph, as a bit-width is in a quantized network."""

    def __init__(self) -> None:
        super().__init__()
        self.bits = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.bits):
            x = x + 1
        return x + (1.0 if torch.compiler.is_compiling() else 0.0)


def test_each_compiled_model_gets_its_own_graphs_within_the_recompile_limit():
    # Two cells in one process: with dynamo's default limit of 8 graphs per code object, shared by every instance
    # of a class, the second model's last bit-widths would run eager. Five graphs each, ten in all.
    x = torch.ones(2)
    for first in (1, 6):
        model = Runtime(torch.device("cpu"), compile=True).prepare_model(_Scaled())
        for bits in range(first, first + 5):
            model.bits = bits
            assert torch.equal(model(x), x + bits + 1)


@pytest.mark.parametrize("options", [{"amp": "bf16"}, {"channels_last": True}, {"data_placement": "device"}])
def test_runtime_options_train_end_to_end(tiny_spec, synthetic, options):
    plain = run_cell(tiny_spec(epochs=1), "anyprecision", 0, synthetic).record
    record = run_cell(tiny_spec(epochs=1, **options), "anyprecision", 0, synthetic).record
    assert record["runtime"] == {**plain["runtime"], **options}
    assert record["sample_passes_total"] == plain["sample_passes_total"]
    loss, reference = record["log"][0]["loss"], plain["log"][0]["loss"]
    assert math.isfinite(loss)
    if options.get("amp") == "bf16":
        assert loss == pytest.approx(reference, rel=0.05)  # bfloat16 matmuls: close, not equal
    elif "channels_last" in options:
        # Another kernel order changes float rounding, which quantizer rounding amplifies (measured: 0.4%).
        assert loss == pytest.approx(reference, rel=0.02)
    else:
        assert loss == reference  # the same tensors, only held elsewhere


def test_bad_runtime_values_are_config_errors():
    with pytest.raises(ConfigError, match="--amp"):
        RunSpec(methods=("anyprecision",), amp="fp8")
    with pytest.raises(ConfigError, match="--data-on"):
        RunSpec(methods=("anyprecision",), data_placement="gpu")


def test_phase_timer_accumulates_and_reports_the_running_phase():
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("train"):
        inside = timer.total_seconds()
        assert inside >= 0.0
    assert timer.seconds["train"] >= inside
    assert timer.total_seconds() == pytest.approx(sum(timer.seconds.values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_phase_timer_uses_events():
    timer = PhaseTimer(torch.device("cuda"))
    x = torch.rand(2048, 2048, device="cuda")
    with timer.phase("train"):
        for _ in range(10):
            x = x @ x
            x = x / x.norm()
    assert timer.seconds["train"] > 0.0


def test_data_bundle_info_survives_placement(synthetic):
    moved = place_data(synthetic, torch.device("cpu"), "device")
    assert isinstance(moved, DataBundle) and moved.info == dataset_info("synthetic")


def test_onednn_is_off_only_for_narrow_cpu_networks(tiny_spec, synthetic):
    assert needs_onednn_off(nn.Conv2d(1, 4, 3), torch.device("cpu"))
    assert not needs_onednn_off(nn.Conv2d(1, 8, 3), torch.device("cpu"))
    assert not needs_onednn_off(nn.Conv2d(1, 4, 3), torch.device("cuda"))
    assert needs_onednn_off(nn.Conv2d(16, 16, 3, groups=4), torch.device("cpu"))  # 4 outputs per group
    from methods.quant.branches import BranchConv2d, amortized_selection

    branches = BranchConv2d(4, 4, 3, 1, 1, 4, amortized_selection((2, 8)))  # one grouped weight of 16 outputs
    assert needs_onednn_off(branches, torch.device("cpu"))
    before = torch.backends.mkldnn.enabled
    record = run_cell(tiny_spec(epochs=1), "anyprecision", 0, synthetic).record  # width 0.25: 4-channel stem
    assert record["runtime"]["onednn"] is False
    assert torch.backends.mkldnn.enabled == before  # restored after the cell
