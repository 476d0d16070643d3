"""Epoch-time table: one training epoch per method, precision, compile setting and data placement on one device.

The harness's own training loop (:func:`harness.train.run_cell`) runs each cell for two epochs and the table gives
the second one's training seconds (the first also compiles, tunes cuDNN and warms the allocator; its seconds are
in the ``first epoch s`` column). Nothing is evaluated or written but the table. Cells run in the order the
options list them (data set, then precision, compile and placement, then method), so the cells that matter most
go first; ``--budget-seconds`` skips the cells that would start after that many seconds, and a cell that fails
becomes a row with its one-line error, so one call on a lent GPU brings back every cell it reached.

The sample passes are the training passes of the second epoch; a method's own phases outside training (EMQ's
scoring, and its re-scoring with ``rescore_every``) count in the whole-cell seconds only, so a re-scoring method's
passes per second read high. List ``fp`` first: the pass-cost column needs its cells, and a budget skips the last.

Data sets: ``cifar-size`` is 50,000 random uint8 3x32x32 training images and 1,000 test images in memory (the
CIFAR geometry and augmentation, random labels: the timing does not depend on what the pixels show); any name the
harness loads (``fashion-mnist``, ``digits``, ``cifar10`` with ``--data-root``) is read as ``cli.py`` reads it.

    python benchmarks/epoch_table.py --device cuda --methods anyprecision,fp --amp bf16,off --compile off,on \\
        --out results/measured/epoch-time.md

The issue's goal (#12): an Any-Precision epoch at bits 2,4,8 on the 50,000 32x32 images within 10 s on one H100
with bf16 and the data on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.config import AMP_MODES, DATA_PLACEMENTS, REFERENCE_METHOD, RunSpec, Schedule
from harness.cost import device_name
from harness.data import DATASETS, load_dataset
from harness.errors import MbqError
from harness.imageset import DataBundle, DatasetInfo, TensorImageSet
from harness.method_config import parse_method_spec
from harness.store import atomic_write_text
from harness.train import instantiate, resolve_device, run_cell

CIFAR_SIZE = "cifar-size"
CIFAR_SIZE_TRAIN, CIFAR_SIZE_TEST = 50_000, 1_000
TIMED_EPOCHS = 2  # the first compiles and warms up; the second is the one reported


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: str
    amp: str
    compile: bool
    placement: str

    def label(self) -> str:
        return f"{self.dataset} {self.method} amp={self.amp} compile={'on' if self.compile else 'off'} " \
               f"data-on={self.placement}"


@dataclass
class Timing:
    cell: Cell
    status: str  # "ok", "skipped (budget)" or "failed: ..."
    first_epoch_s: float | None = None
    epoch_s: float | None = None
    passes_per_s: float | None = None
    cell_s: float | None = None  # the whole call: building, prepare phases (EMQ's scoring) and both epochs


def cifar_size_bundle(train: int = CIFAR_SIZE_TRAIN, test: int = CIFAR_SIZE_TEST, seed: int = 0) -> DataBundle:
    """CIFAR-shaped random uint8 images and labels held in memory (crop-and-flip augmentation, as CIFAR has)."""
    generator = torch.Generator().manual_seed(seed)

    def split(count: int) -> TensorImageSet:
        images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (count,), generator=generator)
        return TensorImageSet(images, labels, augment="crop_flip")

    info = DatasetInfo(CIFAR_SIZE, 10, 3, 32, (0.5,) * 3, (0.25,) * 3, "crop_flip")
    return DataBundle(info=info, train=split(train), test=split(test))


def load_bundle(name: str, data_root: str | None, train_subset: int | None) -> DataBundle:
    if name == CIFAR_SIZE:
        return cifar_size_bundle(train=train_subset or CIFAR_SIZE_TRAIN)
    return load_dataset(name, data_root, train_subset=train_subset)


def time_cell(cell: Cell, data: DataBundle, *, device: str, bits: tuple[int, ...], batch_size: int,
              model: str) -> Timing:
    """Train ``cell`` for two epochs with the harness's loop; the second epoch's seconds and sample passes/s."""
    # three scheduled epochs so that stopping after two skips finalize and evaluation (nothing here is evaluated)
    schedule = Schedule(epochs=TIMED_EPOCHS + 1, batch_size=batch_size)
    # a RunSpec describes a comparison and needs one compared method besides the reference; run_cell trains the
    # method spec it is given, so the full-precision reference's cell names a stand-in
    compared = (cell.method,) if method_name(cell.method) != REFERENCE_METHOD else ("anyprecision",)
    spec = RunSpec(methods=compared, dataset="synthetic" if cell.dataset == CIFAR_SIZE else cell.dataset,
                   model=model, bits=bits, schedule=schedule, device=device, amp=cell.amp, compile=cell.compile,
                   data_placement=cell.placement)
    start = time.perf_counter()
    outcome = run_cell(spec, cell.method, 0, data, stop_after=TIMED_EPOCHS)
    cell_seconds = time.perf_counter() - start
    first, second = outcome.log[0], outcome.log[1]
    passes = second["sample_passes"] - first["sample_passes"]
    return Timing(cell, "ok", first["seconds"], second["seconds"], passes / second["seconds"], cell_seconds)


def method_name(method_spec: str) -> str:
    return parse_method_spec(method_spec)[0]


def one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def run_table(cells: list[Cell], bundles: dict[str, DataBundle], *, device: str, bits: tuple[int, ...],
              batch_size: int, model: str, budget_seconds: float | None, echo=print, on_row=None) -> list[Timing]:
    """Time every cell in order; cells that would start after ``budget_seconds`` are skipped, failures recorded."""
    start, rows = time.perf_counter(), []
    for cell in cells:
        if budget_seconds is not None and time.perf_counter() - start > budget_seconds:
            row = Timing(cell, "skipped (budget)")
        else:
            try:
                row = time_cell(cell, bundles[cell.dataset], device=device, bits=bits, batch_size=batch_size,
                                model=model)
            except Exception as error:  # one failing cell (compile, CUDA, a method's fault) is one row, not the end
                row = Timing(cell, f"failed: {one_line(error)}")
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        rows.append(row)
        echo(f"{cell.label()}: {row.status}" + (f", epoch {row.epoch_s:.2f} s" if row.epoch_s is not None else ""))
        if on_row is not None:
            on_row(rows)
    return rows


def pass_cost_ratio(row: Timing, rows: list[Timing]) -> float | None:
    """Seconds per sample pass of this cell over those of the full-precision reference under the same data,
    precision, compile setting and placement (``fp`` among the methods), or None: the issue's step / (k x fp step)
    ratio, measured over an epoch, and fair to EMQ, whose coreset epochs are shorter."""
    for other in rows:
        same = dataclasses.replace(row.cell, method=REFERENCE_METHOD) == other.cell
        if same and other.passes_per_s and row.passes_per_s:
            return other.passes_per_s / row.passes_per_s
    return None


def _cell(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[Timing], header: dict[str, str]) -> str:
    lines = [f"# Epoch times on {header['device']}", ""]
    lines += [f"* **{key}:** {value}" for key, value in header.items()]
    lines += ["", "| data set | method | precision | compile | data on | first epoch s | epoch s | sample passes/s "
              "| pass cost / fp | cell s | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        c = row.cell
        precision = "bf16" if c.amp == "bf16" else "fp32"
        lines.append(f"| {c.dataset} | {c.method} | {precision} | {'on' if c.compile else 'off'} | {c.placement} "
                     f"| {_cell(row.first_epoch_s)} | {_cell(row.epoch_s)} | {_cell(row.passes_per_s, 0)} "
                     f"| {_cell(pass_cost_ratio(row, rows))} | {_cell(row.cell_s, 1)} | {row.status} |")
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout here: pass --commit)"


class UsageError(ValueError):
    """A bad option: one ``error:`` line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise UsageError(f"{what} must be a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--datasets", default=CIFAR_SIZE, help=f"comma-separated: {CIFAR_SIZE} or a harness data set")
    parser.add_argument("--data-root", default=None, help="where a file-backed data set is read from")
    parser.add_argument("--methods", default="fp,anyprecision,dedicated,emq,adabits,mbquant",
                        help="comma-separated method specs (NAME or NAME:KEY=VALUE)")
    parser.add_argument("--bits", default="2,4,8")
    parser.add_argument("--amp", default="off,bf16", help="comma-separated: off (fp32) and/or bf16")
    parser.add_argument("--compile", default="off", help="comma-separated: off and/or on")
    parser.add_argument("--data-on", default="auto", help="comma-separated: auto, device and/or host")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None, help="train on this many images (smoke runs)")
    parser.add_argument("--budget-seconds", type=float, default=None, help="start no cell after this many seconds")
    parser.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse here)")
    parser.add_argument("--out", default=None, help="write the markdown table here (after every cell)")
    parser.add_argument("--jsonl", action="store_true", help="also write the rows as JSON lines beside --out")
    args = parser.parse_args(argv)
    args.amp = _choices(args.amp, AMP_MODES, "--amp")
    args.compile = [v == "on" for v in _choices(args.compile, ("off", "on"), "--compile")]
    args.data_on = _choices(args.data_on, DATA_PLACEMENTS, "--data-on")
    args.datasets = _choices(args.datasets, (CIFAR_SIZE, *DATASETS), "--datasets")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.bits = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        raise UsageError(f"--bits must be comma-separated integers, got {args.bits!r}") from None
    if not args.methods:
        raise UsageError("--methods lists no method")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = resolve_device(args.device)
        for method_spec in args.methods:
            instantiate(method_spec)  # an unknown method or option fails here, before any data is loaded
        bundles = {name: load_bundle(name, args.data_root, args.train_subset) for name in args.datasets}
    except (UsageError, MbqError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cells = [Cell(d, m, a, c, p) for d, a, c, p, m in
             itertools.product(args.datasets, args.amp, args.compile, args.data_on, args.methods)]
    header = {
        "device": device_name(device) if device.type == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} threads",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "commit": args.commit or _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "setup": f"{args.model}, batch {args.batch_size}, bits {','.join(map(str, args.bits))}; the second of two "
                 f"epochs (train phase seconds; the first compiles and warms up)",
    }
    if device.type == "cuda":
        # fixed shapes: cuDNN picks each convolution's fastest algorithm during the first epoch (a timing tool only;
        # training keeps cuDNN's default); and say whether the "fp32" cells' convolutions ran in TF32
        torch.backends.cudnn.benchmark = True
        header["cudnn"] = (f"benchmark mode; TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'} "
                           f"in the fp32 cells")
    out = Path(args.out) if args.out else None

    def write(rows: list[Timing]) -> None:
        if out is None:
            return
        # rewritten after every cell: atomically, so that a run stopped mid-write leaves the last whole table
        atomic_write_text(out, markdown(rows, header))
        if args.jsonl:
            atomic_write_text(out.with_suffix(".jsonl"),
                              "".join(json.dumps({**dataclasses.asdict(row), **header}) + "\n" for row in rows))

    rows = run_table(cells, bundles, device=str(device), bits=args.bits, batch_size=args.batch_size,
                     model=args.model, budget_seconds=args.budget_seconds, on_row=write)
    print(markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
