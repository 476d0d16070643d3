"""Run directories: atomic writes, checkpoints, per-cell records, and the files of a comparison.

Layout of ``--out DIR``::

    spec.json  env.json  log.csv  summary.csv  table.md
    cells/<method-slug>__seed<k>/checkpoint.pt   (last completed epoch; resumes a killed run)
    cells/<method-slug>__seed<k>/final.pt        (the evaluated state, after finalize; what ``export`` reads)
    cells/<method-slug>__seed<k>/record.json     (written once the cell is finished)

Every file is written to a temporary file in the same folder and renamed over the target, so a reader (or a
killed process) never sees half a file; files get the permissions of the user's umask (as ``open`` would give),
so collaborators on a shared cluster can read a run folder.

Checkpoints and artifacts hold tensors and plain data only (dicts, lists, numbers, strings) and are loaded with
``torch.load(weights_only=True)``: a checkpoint from someone else cannot run code, and one that tries is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from harness import distributed
from harness.errors import MbqError


def _umask_mode() -> int:
    """``0o666`` less the process's umask: the mode ``open(path, "w")`` would create a file with."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename; under torchrun only rank 0 writes."""
    if not distributed.is_writer():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def slug(text: str) -> str:
    """A file-name-safe form of a method spec (``anyprecision:width=5`` -> ``anyprecision_width-5``)."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text.replace("=", "-")).strip("_") or "method"


def check_writable_dir(path: Path) -> None:
    """Fail early, before any output, if ``path`` cannot become a writable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MbqError(f"--out {path} exists and is not a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MbqError(f"--out {path} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MbqError(f"--out {path} is not writable (no write permission on {ancestor})")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    from harness.cost import device_name

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device_name(device),
        "device_type": device.type,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }


def load_tensor_file(path: Path, what: str, remedy: str) -> Any:
    """A file of tensors and plain data, loaded without running any pickled code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports a pickled global (the way a pickle runs code) as "Unsupported global"; anything else is
        # a file that is not a checkpoint at all
        if "unsupported global" not in str(exc).lower():
            raise MbqError(f"{what} {path} is corrupt (UnpicklingError); {remedy}") from exc
        raise MbqError(f"{what} {path} holds Python objects besides tensors and plain data and was refused "
                       f"(loading it could run code); {remedy}") from exc
    except Exception as exc:  # noqa: BLE001 - any other failure to read it means the same thing to the user
        raise MbqError(f"{what} {path} is corrupt ({type(exc).__name__}); {remedy}") from exc


class RunStore:
    """The output folder of one comparison."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def cell_dir(self, method_label: str, seed: int) -> Path:
        return self.root / "cells" / f"{slug(method_label)}__seed{seed}"

    def checkpoint_path(self, method_label: str, seed: int) -> Path:
        return self.cell_dir(method_label, seed) / "checkpoint.pt"

    def record_path(self, method_label: str, seed: int) -> Path:
        return self.cell_dir(method_label, seed) / "record.json"

    def read_spec(self) -> dict[str, Any] | None:
        path = self.root / "spec.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MbqError(f"{path} is unreadable ({exc}); use another --out") from exc

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_json(self.root / name, data)

    def load_checkpoint(self, method_label: str, seed: int) -> dict[str, Any] | None:
        path = self.checkpoint_path(method_label, seed)
        if not path.exists():
            return None
        return load_tensor_file(path, "checkpoint", "delete it to restart")

    def save_checkpoint(self, method_label: str, seed: int, state: dict[str, Any]) -> None:
        atomic_torch_save(self.checkpoint_path(method_label, seed), state)

    def final_path(self, method_label: str, seed: int) -> Path:
        return self.cell_dir(method_label, seed) / "final.pt"

    def save_final(self, method_label: str, seed: int, state: dict[str, Any]) -> None:
        """The model and method state the record was evaluated with (after the finalize phase)."""
        atomic_torch_save(self.final_path(method_label, seed), state)

    def load_final(self, method_label: str, seed: int) -> dict[str, Any] | None:
        path = self.final_path(method_label, seed)
        if not path.exists():
            return None
        return load_tensor_file(path, "final state", "delete it and rerun the cell")

    def save_artifacts(self, method_label: str, seed: int, artifacts: dict[str, Any]) -> None:
        atomic_torch_save(self.cell_dir(method_label, seed) / "artifacts.pt", artifacts)

    def load_record(self, method_label: str, seed: int) -> dict[str, Any] | None:
        path = self.record_path(method_label, seed)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MbqError(f"record {path} is corrupt ({exc}); delete it to rerun that cell") from exc

    def save_record(self, method_label: str, seed: int, record: dict[str, Any]) -> None:
        atomic_write_json(self.record_path(method_label, seed), record)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted((self.root / "cells").glob("*/record.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                raise MbqError(f"record {path} is corrupt ({exc})") from exc
        return out

    def write_log(self, rows_by_cell: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
        atomic_write_text(self.root / "log.csv", csv_text(list(rows_by_cell), columns))
