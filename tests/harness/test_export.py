"""Export: bit packing, payload = storage columns, a network rebuilt from the file alone gives the trained logits,
and the `export` command on a tiny run folder (one line and exit 2 on bad input)."""

from __future__ import annotations

import pytest
import torch

import cli
import harness.export as export
from harness.data import DatasetInfo, load_dataset
from harness.errors import ConfigError, MbqError
from harness.evaluate import evaluate_bits
from harness.export import (
    Codes,
    data_header,
    exported_method,
    file_payload_bits,
    load_exported,
    pack_codes,
    unpack_codes,
    write_export,
)
from harness.registry import get_method, list_methods
from harness.store import RunStore
from harness.train import instantiate
from methods.mbquant import initialize_bounds
from methods.quant.bias_correction import BiasCorrectedQuantizer
from methods.quant.dorefa import dorefa_weight
from methods.quant.statsq import statsq_weight
from methods.quant.weight_codes import weight_codec

INFO = DatasetInfo("synthetic", 10, 1, 8, (0.5,), (0.25,), "none")
CANDIDATE_BITS = (*range(1, 9), 32)


# -- bit packing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, codes, expected", [
    (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0b10001101, 0b00000001]),  # LSB first; 9 codes -> 2 bytes
    (2, [1, 2, 3, 0, 3], [1 | 2 << 2 | 3 << 4 | 0 << 6, 3]),     # 0x39, 0x03
    (3, [5, 3, 7], [0xDD, 0x01]),                                 # 5 | 3 << 3 | 7 << 6 = 477
    (5, [31, 0, 17], [0x1F, 0x44]),                               # 31 | 17 << 10 = 17439
    (8, [0, 255, 17], [0, 255, 17]),
])
def test_pack_gives_known_little_endian_bytes_and_unpacks_back(bits, codes, expected):
    packed = pack_codes(torch.tensor(codes), bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == expected
    assert unpack_codes(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 11, 16])
def test_pack_round_trips_across_chunk_seams(monkeypatch, bits):
    monkeypatch.setattr(export, "PACK_CHUNK", 16)  # many chunks, so every seam between them is crossed
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 37), generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).view(3, 37), codes)


def test_codes_out_of_range_or_float_are_refused():
    with pytest.raises(ValueError, match="out of range for 2 bits"):
        Codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="integer"):
        Codes(torch.tensor([0.0, 1.0]), 2)


# -- codecs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer", [dorefa_weight, statsq_weight, BiasCorrectedQuantizer(dorefa_weight),
                                       BiasCorrectedQuantizer(statsq_weight, "per_channel")], ids=repr)
def test_decoded_codes_are_the_quantizer_forward_bit_for_bit(quantizer):
    weight = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.2
    codec = weight_codec(quantizer)
    for bits in range(1, 9):
        codes, constants = codec.encode(weight, bits)
        assert int(codes.min()) >= 0 and int(codes.max()) < 2**bits
        assert torch.equal(codec.decode(codes, constants, bits), quantizer(weight, bits))


# -- every method: payload = storage, logits from the file alone ------------------------------------------------------
def servable_bits(method) -> tuple[int, ...]:
    fixed = getattr(method, "fixed_bits", None)
    if fixed is not None:
        return tuple(fixed)
    bits = []
    for b in CANDIDATE_BITS:
        try:
            method.check_bits((b,))
        except ConfigError:
            continue
        bits.append(b)
    return tuple(bits)


@torch.no_grad()
def trained_looking(method, model, generator):
    """BN statistics, affine parameters, clipping levels, LSQ steps and MBQuant bounds away from their defaults."""
    if method.name == "mbquant":
        model.train()
        initialize_bounds(model, torch.rand(16, 1, 8, 8, generator=generator))
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name in ("running_var", "adapted_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
            elif name in ("running_mean", "adapted_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name == "adapted":  # EMQ: some bit-widths adapted, some on the BN's own statistics
                buffer.copy_(torch.rand(buffer.shape, generator=generator) > 0.5)
            elif name == "initialized":
                buffer.fill_(True)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine:
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        if hasattr(module, "steps"):
            module.steps.copy_(torch.rand(module.steps.shape, generator=generator) * 0.5 + 0.1)
        for alpha in getattr(module, "alphas", {}).values():
            alpha.copy_(torch.rand((), generator=generator) * 3 + 1)
    model.eval()


def header_for(spec: str, method, model_name: str, trained, bits) -> dict:
    header = {"method": spec, "method_name": method.name, "model": model_name, "width": 0.25, "num_classes": 10,
              "trained_bits": list(trained), "data": data_header(INFO),
              "bits": "all" if isinstance(bits, tuple) else bits}
    if isinstance(bits, tuple):
        header["bits_set"] = list(bits)
    return header


def check_export(tmp_path, spec: str, model_name: str = "resnet20") -> None:
    method = instantiate(spec)
    trained = servable_bits(method)
    if model_name == "deit_tiny":
        trained = tuple(b for b in trained if b != 1)  # signed LSQ has no 1-bit form
    torch.manual_seed(0)
    model = method.build(model_name, 10, trained, INFO, 0.25)
    generator = torch.Generator().manual_seed(1)
    trained_looking(method, model, generator)
    x = torch.rand(4, 1, 8, 8, generator=generator)
    path = tmp_path / "model.safetensors"
    for target in (*trained, trained):
        tensors = export.export_tensors(method, model, target)
        write_export(path, tensors, header_for(spec, method, model_name, trained, target))
        counted = method.storage_total(model, target) if isinstance(target, tuple) else method.storage(model, target)
        assert file_payload_bits(path) // 8 == counted  # the storage column is the file's tensor payload
        loaded, bits, header = load_exported(path)
        assert bits == target and header["payload_bytes"] == counted
        switch = exported_method(header)
        for b in target if isinstance(target, tuple) else (target,):
            with torch.no_grad():
                method.set_bits(model, b)
                expected = model(x)
                switch.set_bits(loaded, b)
                got = loaded(x)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=f"{spec} exported {target}, at {b}")
            assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", list_methods())
def test_every_method_exports_its_storage_and_the_file_alone_gives_its_logits(tmp_path, name):
    check_export(tmp_path, name)


@pytest.mark.parametrize("spec, model_name", [
    ("emq:bias_correction=per_channel", "resnet20"),
    ("emq:bias_correction=off", "preact_resnet20"),
    ("emq", "deit_tiny"),
    ("mbquant:bounds_by=position", "resnet20"),
    ("mbquant:shortcut=full_precision", "preact_resnet20"),
    ("adabits:quantize_stem=true:quantize_head=true:raw_input=true", "resnet20"),
    ("adabits:switchable_clipping=false:weight_scheme=original:fp_shortcut=true", "resnet20"),
    ("anyprecision:fp_shortcut=true", "preact_resnet20"),
])
def test_options_that_change_what_is_stored_export_exactly_too(tmp_path, spec, model_name):
    check_export(tmp_path, spec, model_name)


def test_a_single_bit_file_serves_only_its_bit_width(tmp_path):
    method = get_method("anyprecision")()
    model = method.build("resnet20", 10, (2, 4), INFO, 0.25).eval()
    path = tmp_path / "two.safetensors"
    write_export(path, export.export_tensors(method, model, 2), header_for("anyprecision", method, "resnet20",
                                                                          (2, 4), 2))
    loaded, bits, header = load_exported(path)
    assert bits == 2 and header["data"] == {"name": "synthetic", "in_chans": 1, "image_size": 8, "mean": [0.5],
                                            "std": [0.25]}
    assert all(torch.isnan(p).all() for n, p in loaded.named_parameters() if n.startswith("blocks.0.bn1.norms.4."))
    method.set_bits(loaded, 4)
    with pytest.raises(ConfigError, match="holds weights for bits \\[2\\], not 4"):
        loaded(torch.rand(2, 1, 8, 8))


def test_a_set_counted_as_one_highest_copy_cannot_be_exported_whole():
    method = get_method("anyprecision").from_options({"total_storage": "highest"})
    model = method.build("resnet20", 10, (2, 4), INFO, 0.25)
    with pytest.raises(MbqError, match="cannot be exported as one artifact"):
        export.export_tensors(method, model, (2, 4))


# -- the command on a tiny run folder ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One finished EMQ cell without coresets (BN adaptation runs in finalize, after the last checkpoint)."""
    out = tmp_path_factory.mktemp("export_run") / "run"
    code = cli.run(["compare", "--methods", "emq:prune=0", "--dataset", "synthetic", "--model", "resnet20",
                    "--width", "0.25", "--bits", "2,4", "--eval-bits", "2,3,4", "--epochs", "1", "--batch-size",
                    "32", "--train-subset", "64", "--test-subset", "32", "--reference", "none", "--quiet",
                    "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.parametrize("bits", ["3", "all"])
def test_export_command_writes_the_record_storage_and_the_evaluated_network(capsys, tmp_path, run_dir, bits):
    target = tmp_path / "emq.safetensors"
    assert cli.run(["export", str(run_dir), "--method", "emq:prune=0", "--bits", bits, "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    record = RunStore(run_dir).load_record("emq:prune=0", 0)
    stored = record["storage_total_bytes"] if bits == "all" else record["results"][bits]["storage_bytes"]
    assert file_payload_bits(target) // 8 == stored and f"payload {stored} bytes" in printed
    model, _, header = load_exported(target)
    test_set = load_dataset("synthetic", test_subset=32).test
    evaluated = (3,) if bits == "3" else (2, 4)
    accuracy = evaluate_bits(model, exported_method(header), test_set, evaluated, 64, torch.device("cpu"))
    assert {b: accuracy[b]["top1"] for b in evaluated} == {b: record["results"][str(b)]["top1"] for b in evaluated}


def test_a_folder_without_final_state_is_refused_for_a_method_that_finalizes(capsys, tmp_path, run_dir):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "cells" / "emq_prune_0__seed0" / "final.pt").unlink()
    code = cli.run(["export", str(old), "--method", "emq:prune=0", "--bits", "2", "--out", str(tmp_path / "x.st")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no final.pt" in err and not (tmp_path / "x.st").exists()


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--method", "emq:prune=0", "--bits", "2"], "does not exist"),
    (["{run}", "--method", "mbquant", "--bits", "2"], "has no cells of method 'mbquant'"),
    (["{run}", "--method", "emq:prune=0", "--bits", "5"], "evaluated at bits 2, 3, 4, not 5"),
    (["{run}", "--method", "emq:prune=0", "--bits", "2", "--seed", "9"], "has no seed 9"),
    (["{run}", "--method", "emq:prune=0", "--bits", "two"], "--bits must be a bit-width"),
    (["{run}", "--method", "emq:prune=0", "--bits", "2", "--out", "{tmp}"], "is a folder"),
])
def test_bad_export_input_is_one_line_exit_2_and_writes_no_file(capsys, tmp_path, run_dir, args, message):
    target = tmp_path / "out.safetensors"
    args = [a.replace("{missing}", str(tmp_path / "nowhere")).replace("{run}", str(run_dir)) for a in args]
    if "--out" in args:
        args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    else:
        args += ["--out", str(target)]
    code = cli.run(["export", *args])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert "Traceback" not in captured.err and not target.exists()
