"""The command line: bad input is one ``error:`` line, exit 2, no traceback and no output folder."""

from __future__ import annotations

import gzip
import json
import struct

import pytest

import cli

TINY = ["--dataset", "synthetic", "--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--width", "0.25",
        "--bits", "2,32", "--quiet"]


def run_cli(capsys, args):
    code = cli.run(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_bad_fashion_mnist(root):
    root.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(root / name, "wb") as handle:
            handle.write(struct.pack(">IIII", 0xDEAD, 1, 28, 28) + bytes(784))


@pytest.mark.parametrize("args", [
    ["--methods", "nosuchmethod"],
    ["--methods", "anyprecision,"],
    ["--methods", "anyprecision:nosuchoption=1"],
    ["--methods", "anyprecision:width=abc"],
    ["--methods", "anyprecision,anyprecision"],
    ["--dataset", "nosuchdata"],
    ["--model", "nosuchmodel"],
    ["--bits", "0"], ["--bits", "33"], ["--bits", "abc"], ["--bits", ""], ["--bits", "2,2"],
    ["--epochs", "0"], ["--epochs", "abc"], ["--lr=-0.1"], ["--lr", "nan"],
    ["--seed", "x"], ["--baseline", "dedicated"],
    ["--budget", "passes=3"], ["--budget", "sample-passes=0"], ["--budget", "device-hours=abc"],
    ["--amp", "fp8"], ["--data-on", "gpu"], ["--threads", "0"],
    ["--executor", "slurm"], ["--partition", "gpu"],
    ["--reference", "int8"], ["--methods", "anyprecision,fp", "--reference", "none"], ["--methods", "fp"],
    ["--baseline", "fp", "--reference", "none"],
    ["--dataset", "fashion-mnist", "--data-root", "{tmp}/missing"],
    ["--dataset", "cifar10", "--data-root", "{tmp}/missing"],
    ["--dataset", "fashion-mnist", "--data-root", "{tmp}/corrupt"],
    ["--nosuchflag"],
    ["--eval-bits", "3"],  # anyprecision has no BN for an untrained bit-width
    ["--model", "deit_tiny"],  # anyprecision quantizes convolutional models only
    ["--momentum", "5"], ["--momentum", "1"],
    ["--train-subset", "100000"],  # more than the synthetic training split
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, args):
    write_bad_fashion_mnist(tmp_path / "corrupt")
    out_dir = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    not_quiet = [a for a in TINY if a != "--quiet"]
    code, out, err = run_cli(capsys, ["compare", "--methods", "anyprecision", *not_quiet, "--out", str(out_dir), *args])
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    assert not out_dir.exists()


def test_unwritable_out_is_one_line_error(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, ["compare", "--methods", "anyprecision", *TINY, "--out", str(blocker / "sub")])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "not a directory" in err


def test_folder_of_another_comparison_is_refused(capsys, tmp_path):
    out_dir = tmp_path / "out"
    assert run_cli(capsys, ["compare", "--methods", "anyprecision", *TINY, "--out", str(out_dir)])[0] == 0
    code, _, err = run_cli(capsys, ["compare", "--methods", "dedicated", *TINY, "--out", str(out_dir)])
    assert code == 2 and "different comparison" in err


def test_compare_writes_every_file_and_report_rebuilds_the_table(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, ["compare", "--methods", "anyprecision,dedicated", *TINY, "--out", str(out_dir)])
    assert code == 0
    for name in ("spec.json", "env.json", "log.csv", "summary.csv", "table.md", "table.tex", "accuracy.png"):
        assert (out_dir / name).is_file(), name
    assert out.startswith("| method |") and "| anyprecision |" in out and "| dedicated |" in out
    assert out.splitlines()[2].startswith("| fp (reference) |")  # the default --reference fp, the first row
    assert (out_dir / "cells" / "fp__seed0" / "record.json").is_file()
    header = (out_dir / "summary.csv").read_text().splitlines()[0].split(",")
    required = "method,bits,top1,top5,storage_mb,storage_total_mb,device_hours,sample_passes,device,dataset,model," \
               "epochs,seed".split(",")
    assert set(required) <= set(header)
    assert not list(out_dir.rglob("*.tmp"))
    table = (out_dir / "table.md").read_text()
    (out_dir / "table.md").unlink()
    code, out, _ = run_cli(capsys, ["report", str(out_dir)])
    assert code == 0 and (out_dir / "table.md").read_text() == table and out.strip() == table.strip()


@pytest.mark.parametrize("what,expected", [("methods", "anyprecision"), ("datasets", "fashion-mnist"),
                                           ("models", "preact_resnet20")])
def test_list(capsys, what, expected):
    code, out, _ = run_cli(capsys, ["list", what])
    assert code == 0 and expected in out


@pytest.mark.parametrize("command", [[], ["compare"], ["list"], ["report"], ["reproduce"]])
def test_help_explains_every_command(capsys, command):
    code, out, _ = run_cli(capsys, [*command, "--help"])
    assert code == 0 and "Usage:" in out
    if command == ["compare"]:
        for option in ("--methods", "--bits", "--epochs", "--seed", "--out", "--train-subset", "--device", "--budget",
                       "--amp", "--channels-last", "--compile", "--data-on", "--executor", "--threads",
                       "--reference"):
            assert option in out


def test_report_of_a_folder_without_records_is_an_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["report", str(tmp_path)])
    assert code == 2 and err.startswith("error: ")
    code, _, err = run_cli(capsys, ["report", str(tmp_path / "nowhere")])
    assert code == 2 and err == f"error: {tmp_path / 'nowhere'} does not exist\n"


@pytest.mark.parametrize(("args", "expected"), [
    (["--momentum", "5"], "error: --momentum must be in [0, 1), got 5.0\n"),
    (["--batch-size", "0"], "error: --batch-size must be a positive integer, got 0\n"),
    (["--train-subset", "100000"],
     "error: --train-subset 100000 is larger than the synthetic training split (512 samples)\n"),
])
def test_errors_name_the_flags(capsys, tmp_path, args, expected):
    code, _, err = run_cli(capsys, ["compare", "--methods", "anyprecision", *TINY, "--out", str(tmp_path / "o"), *args])
    assert code == 2 and err == expected


def test_a_budget_spent_by_the_prepare_phase_alone_is_one_line(capsys, tmp_path):
    """Found only once EMQ has scored (its cost depends on the run), so the run folder exists; no table is written."""
    code, _, err = run_cli(capsys, ["compare", "--methods", "emq:score_epochs=3", *TINY, "--budget",
                                    "sample-passes=100", "--reference", "none", "--out", str(tmp_path / "o")])
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: emq:score_epochs=3: the budget sample-passes=100 is spent by its prepare phase alone")
    assert not (tmp_path / "o" / "table.md").exists()


def test_list_methods_verbose_shows_every_option_with_type_and_default(capsys):
    code, out, _ = run_cli(capsys, ["list", "methods", "-v"])
    assert code == 0
    assert "                  prune: float = 0.8\n" in out
    assert "                  odd_bits: Literal['partial_branch', 'error'] = partial_branch\n" in out
    assert "                  rescore_every: int | None = none\n" in out


def test_resumed_cell_says_where_it_resumes(capsys, tmp_path, monkeypatch):
    import harness.executors as executors

    out_dir = tmp_path / "out"
    base = ["compare", "--methods", "anyprecision", *[a for a in TINY if a != "--quiet"], "--epochs", "3",
            "--reference", "none", "--out", str(out_dir)]
    original = executors.run_cell
    # the first run stops after one epoch, as a kill would
    monkeypatch.setattr(executors, "run_cell", lambda *a, **k: original(*a, **{**k, "stop_after": 1}))
    with pytest.raises(TypeError):  # the stopped cell has no record to tabulate
        cli.run(base)
    monkeypatch.undo()
    capsys.readouterr()
    code, _, err = run_cli(capsys, base)
    assert code == 0 and "anyprecision seed 0: resuming at epoch 2" in err and "training" not in err


def test_budget_run_tabulates_epochs_run_and_report_rebuilds_it_byte_for_byte(capsys, tmp_path):
    out_dir = tmp_path / "out"
    args = ["compare", "--methods", "anyprecision,dedicated", *TINY, "--budget", "sample-passes=200",
            "--out", str(out_dir)]
    code, out, _ = run_cli(capsys, args)
    assert code == 0 and "epochs run" in out and "Equal-cost run" in out and "| fp (reference) |" in out
    table = (out_dir / "table.md").read_bytes()
    code, _, _ = run_cli(capsys, ["report", str(out_dir), "--out", str(tmp_path / "rebuilt")])
    assert code == 0 and (tmp_path / "rebuilt" / "table.md").read_bytes() == table


def test_reference_none_trains_and_tabulates_no_fp(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, ["compare", "--methods", "dedicated", *TINY, "--reference", "none",
                                    "--out", str(out_dir)])
    assert code == 0 and "| dedicated |" in out and "fp" not in out.split("\n\n")[0]
    assert [p.name for p in (out_dir / "cells").iterdir()] == ["dedicated__seed0"]
    assert json.loads((out_dir / "spec.json").read_text())["reference"] == "none"
    assert not any(line.startswith("fp,") for line in (out_dir / "summary.csv").read_text().splitlines())
