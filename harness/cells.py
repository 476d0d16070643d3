"""A finished cell of a run folder, rebuilt as it was evaluated, and its export to a deployment file
(:mod:`harness.export`; the ``cli.py export`` command)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harness.cost import FLOAT_BITS
from harness.errors import MbqError
from harness.export import ALL_BITS, data_header, export_tensors, write_export

if TYPE_CHECKING:
    from harness.config import RunSpec
    from harness.data import DatasetInfo
    from harness.method import Method


@dataclass
class TrainedCell:
    """A finished cell of a run folder, rebuilt with the state its record was evaluated with."""

    method_spec: str
    seed: int
    method: Method
    model: nn.Module
    spec: RunSpec
    info: DatasetInfo
    record: dict[str, Any]


def trained_cell(run_dir: Path, method_spec: str, seed: int | None = None) -> TrainedCell:
    """Rebuild the trained network of cell (``method_spec``, ``seed``; default the run's first seed) of a run folder:
    the method's network as ``harness.train`` builds it with the state the record was evaluated with
    (``final.pt``, written after the finalize phase). A folder from before ``final.pt`` existed gives the last
    checkpoint's state, which is the evaluated one only for a method without a ``finalize`` phase."""
    from harness.config import RunSpec
    from harness.data import dataset_info
    from harness.method import Method
    from harness.store import RunStore
    from harness.train import cell_spec, instantiate

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MbqError(f"{run_dir} does not exist or is not a folder")
    store = RunStore(run_dir)
    raw = store.read_spec()
    if raw is None:
        raise MbqError(f"{run_dir} is not a run folder (no spec.json inside)")
    spec = RunSpec.from_dict(raw)
    if method_spec not in spec.cell_methods:
        raise MbqError(f"{run_dir} has no cells of method {method_spec!r}; its methods: {', '.join(spec.cell_methods)}")
    seed = spec.seeds[0] if seed is None else seed
    if seed not in spec.seeds:
        raise MbqError(f"{run_dir} has no seed {seed}; its seeds: {', '.join(map(str, spec.seeds))}")
    record = store.load_record(method_spec, seed)
    final = store.load_final(method_spec, seed)
    method = instantiate(method_spec)
    if record is not None and final is None and type(method).finalize is not Method.finalize:
        # a folder written before final.pt existed: its checkpoint predates the finalize phase (replaying that phase
        # in another process was measured to give other BN statistics), so the evaluated network is not on disk
        raise MbqError(f"cell {method_spec} seed {seed} of {run_dir} has no final.pt (written by a version before "
                       f"export existed) and its method changes the network after the last checkpoint; delete the "
                       f"cell's record.json and run its comparison again")
    state = final if final is not None else store.load_checkpoint(method_spec, seed)
    if record is None or state is None:
        raise MbqError(f"cell {method_spec} seed {seed} of {run_dir} has not finished (no record.json or "
                       f"checkpoint.pt); run its comparison to the end first")
    cell = cell_spec(spec, method)
    info = dataset_info(cell.dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = method.build(cell.model, info.num_classes, cell.bits, info, cell.width)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise MbqError(f"the checkpoint of {method_spec} seed {seed} does not fit the network this code builds "
                       f"({str(exc).splitlines()[0]})") from exc
    method.load_state_dict(state["method_state"])
    return TrainedCell(method_spec, seed, method, model.eval(), cell, info, record)


def parse_export_bits(text: str) -> int | str:
    """``--bits`` of ``export``: a bit-width (1..32) or ``all``."""
    if text.strip().lower() == ALL_BITS:
        return ALL_BITS
    try:
        bits = int(text)
    except ValueError:
        raise MbqError(f"--bits must be a bit-width (1..32) or 'all', got {text!r}") from None
    if not 1 <= bits <= FLOAT_BITS:
        raise MbqError(f"--bits must be in 1..32 or 'all', got {bits}")
    return bits


def export_cell(run_dir: Path, method_spec: str, bits: int | str, out: Path, seed: int | None = None
                ) -> dict[str, Any]:
    """Export cell (``method_spec``, ``seed``) of a run folder at ``bits`` (a bit-width the cell evaluated, or
    ``"all"``: its trained set) to ``out``; returns the header written (``payload_bytes`` among it)."""
    from harness.store import check_writable_dir

    out = Path(out)
    if out.is_dir():
        raise MbqError(f"--out {out} is a folder; give a file name such as model.safetensors")
    check_writable_dir(out.parent)  # before the (possibly slow) rebuild
    cell = trained_cell(run_dir, method_spec, seed)
    if bits == ALL_BITS:
        chosen: int | tuple[int, ...] = tuple(cell.spec.bits)
    else:
        if bits not in cell.spec.evaluated_bits:
            raise MbqError(f"{method_spec} seed {cell.seed} was evaluated at bits "
                           f"{', '.join(map(str, cell.spec.evaluated_bits))}, not {bits}; export one of those or all")
        chosen = int(bits)
    tensors = export_tensors(cell.method, cell.model, chosen)
    header = {
        "method": method_spec, "method_name": cell.method.name, "model": cell.spec.model, "width": cell.spec.width,
        "num_classes": cell.info.num_classes, "trained_bits": list(cell.spec.bits),
        "bits": ALL_BITS if isinstance(chosen, tuple) else chosen,
        **({"bits_set": list(chosen)} if isinstance(chosen, tuple) else {}),
        "data": data_header(cell.info), "source": {"run": str(run_dir), "seed": cell.seed},
        "record_storage_bytes": (cell.record["storage_total_bytes"] if isinstance(chosen, tuple)
                                 else cell.record["results"][str(chosen)]["storage_bytes"]),
    }
    return write_export(out, tensors, header)
