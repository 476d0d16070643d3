"""Deployment artifacts: the tensors that serving a trained network at one bit-width (or its whole switchable set)
needs, in a safetensors file (no pickle) whose payload equals the storage columns of the tables.

A file holds, and holds only:

* integer weight codes, packed at their bit-width into uint8 words (:func:`pack_codes`: code ``i`` occupies bits
  ``i*B .. i*B+B-1`` of the byte stream, least significant bit first; the last byte is zero-padded);
* float32 tensors: each layer's constants (DoReFa's scale ``E``, EMQ's fused scale and offset, StatsQ's row
  scales, activation clipping levels, LSQ steps, MBQuant's activation bounds), the batch norms of the bit-width
  (gamma, beta, running mean and variance) and the full-precision layers;
* a JSON header in the safetensors metadata under ``"mbqbench"``: format version, method spec, model, width,
  number of classes, trained bit-widths, the exported bits (a bit-width or ``"all"``), the data set's input
  description and normalization, and the bit-width and shape of every packed tensor.

**Storage rule.** The payload of a file is ``sum(codes x bits) + 32 x (number of float values)`` bits: the header
and the padding to whole bytes are not counted. A record's ``storage_bytes`` (the ``storage_mb`` column, in 10^6
bytes) is :meth:`harness.method.Method.storage` at that bit-width and ``storage_total_bytes`` (``storage_total_mb``)
:meth:`~harness.method.Method.storage_total` of the trained set, each the payload in bits divided by 8, rounded
down; :func:`export_tensors` checks layer by layer that what it writes is what ``storage_bits`` counts.

**Layer protocol** (next to ``storage_bits`` / ``storage_bits_total``, see :mod:`harness.cost`): a layer with its own
storage rule implements ``export_tensors(bits)`` and ``export_tensors_total(bits_set)`` (name -> float tensor or
:class:`Codes`, names relative to the layer) and ``load_exported(tensors, bits)`` /
``load_exported_total(tensors, bits_set)``, which make the layer serve those bit-widths from the tensors alone
(codes arrive unpacked as int64 tensors). A layer whose storage is 0 needs none of them. Every other layer
exports its parameters and persistent floating-point buffers (:func:`harness.cost.plain_tensors`) under their own
names. :func:`load_exported` rebuilds the method's network from the header, fills every parameter and
persistent floating-point buffer with NaN (so nothing of the random initialization can reach the logits: a
bit-width the file does not serve gives NaN), loads the file's tensors and switches to the exported bit-width.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harness.cost import FLOAT_BITS, plain_tensors
from harness.errors import MbqError

if TYPE_CHECKING:
    from harness.data import DatasetInfo
    from harness.method import Method

FORMAT_VERSION = 1
HEADER_KEY = "mbqbench"
ALL_BITS = "all"
#: codes packed per step of :func:`pack_codes` (a multiple of 8, so that every chunk ends on a byte boundary)
PACK_CHUNK = 1 << 20


class ExportMismatch(RuntimeError):
    """A layer exported a payload different from what its ``storage_bits`` counts (a bug in that layer)."""


@dataclass(frozen=True)
class Codes:
    """Unsigned integer codes of ``bits`` bits each (stored packed); ``values`` keeps the weight's shape."""

    values: torch.Tensor
    bits: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 31:
            raise ValueError(f"codes need 1..31 bits, got {self.bits}")
        if self.values.is_floating_point() or self.values.is_complex():
            raise ValueError("codes must be an integer tensor")
        if self.values.numel() and (int(self.values.min()) < 0 or int(self.values.max()) >= 2**self.bits):
            raise ValueError(f"codes out of range for {self.bits} bits: {int(self.values.min())}.."
                             f"{int(self.values.max())}")


Exported = torch.Tensor | Codes


# -- bit packing ------------------------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``bits``-bit unsigned ``codes`` (any shape, flattened) as a uint8 tensor of ``ceil(n * bits / 8)`` bytes:
    code ``i`` occupies bits ``i*bits .. i*bits+bits-1`` of the little-endian bit stream (bit ``k`` of the stream is
    bit ``k % 8`` of byte ``k // 8``), the code's least significant bit first; the last byte is zero-padded."""
    flat = Codes(codes, bits).values.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int64)
    parts = []
    for start in range(0, flat.numel(), PACK_CHUNK):
        stream = ((flat[start:start + PACK_CHUNK, None] >> shifts) & 1).reshape(-1)
        stream = torch.cat((stream, stream.new_zeros(-stream.numel() % 8)))
        parts.append((stream.view(-1, 8) * weights).sum(dim=1).to(torch.uint8))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` ``bits``-bit codes of ``packed`` (:func:`pack_codes`'s layout), as int64."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(count * bits / 8):
        raise MbqError(f"a packed code tensor must be {math.ceil(count * bits / 8)} uint8 bytes for {count} "
                       f"{bits}-bit codes, got {packed.dtype} of shape {tuple(packed.shape)}")
    shifts = torch.arange(bits, dtype=torch.int64)
    bytes_per_chunk = PACK_CHUNK * bits // 8
    parts = []
    for start in range(0, packed.numel(), bytes_per_chunk):
        chunk = packed[start:start + bytes_per_chunk].to(torch.int64)
        stream = ((chunk[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)
        whole = stream.numel() // bits
        parts.append((stream[:whole * bits].view(whole, bits) << shifts).sum(dim=1))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return flat[:count]


# -- payload -----------------------------------------------------------------------------------------------------------
def payload_bits(tensors: Mapping[str, Exported]) -> int:
    """``numel x bits`` per code tensor plus 32 bits per float value (the storage rule, module docstring)."""
    return sum(v.values.numel() * v.bits if isinstance(v, Codes) else v.numel() * FLOAT_BITS
               for v in tensors.values())


def with_prefix(prefix: str, tensors: Mapping[str, Exported]) -> dict[str, Exported]:
    return {prefix + name: value for name, value in tensors.items()}


def take_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove the entries under ``prefix`` from ``tensors`` and return them with the prefix stripped."""
    names = [name for name in tensors if name.startswith(prefix)]
    return {name[len(prefix):]: tensors.pop(name) for name in names}


def tensor_at(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer at dotted ``name`` below ``module`` (``norms.4.weight``, ``act_lower.2``)."""
    path, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(path) if path else module
        target = getattr(owner, leaf)
    except AttributeError:
        target = None
    if not isinstance(target, torch.Tensor):
        raise MbqError(f"the exported tensor {name!r} has no place in {type(module).__name__}")
    return target


@torch.no_grad()
def assign_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy each exported tensor into the parameter or buffer of the same dotted name below ``module``."""
    for name, value in tensors.items():
        target = tensor_at(module, name)
        if tuple(target.shape) != tuple(value.shape):
            raise MbqError(f"the exported tensor {name!r} has shape {tuple(value.shape)}; "
                           f"{type(module).__name__} expects {tuple(target.shape)}")
        target.copy_(value)


# -- the model walk (the same walk as harness.cost's storage count) ---------------------------------------------------
def _walk_export(module: nn.Module, prefix: str, own: Callable[[nn.Module], dict[str, Exported] | None]
                 ) -> dict[str, Exported]:
    mine = own(module)
    if mine is not None:
        return with_prefix(prefix, mine)
    out: dict[str, Exported] = with_prefix(prefix, plain_tensors(module))
    for name, child in module.named_children():
        out.update(_walk_export(child, f"{prefix}{name}.", own))
    return out


def _layer_tensors(module: nn.Module, export: str, storage: str, arg: Any) -> dict[str, Exported] | None:
    """What a layer with its own storage rule exports (checked against that rule); None for any other module."""
    if not hasattr(module, storage):
        return None
    expected = getattr(module, storage)(arg)
    if hasattr(module, export):
        tensors = dict(getattr(module, export)(arg))
    elif expected == 0:
        tensors = {}
    else:
        raise MbqError(f"{type(module).__name__} counts {expected} storage bits but cannot be exported (it has no "
                       f"{export} method)")
    got = payload_bits(tensors)
    if got != expected:
        raise ExportMismatch(f"{type(module).__name__}.{export}({arg}) writes {got} payload bits, but its {storage} "
                             f"counts {expected}")
    return tensors


@torch.no_grad()
def export_model(model: nn.Module, bits: int) -> dict[str, Exported]:
    """The tensors deploying ``model`` at ``bits`` stores; their payload is ``storage_bits_of(model, bits)``."""
    return _walk_export(model, "", lambda m: _layer_tensors(m, "export_tensors", "storage_bits", bits))


@torch.no_grad()
def export_model_total(model: nn.Module, bits_set: Iterable[int]) -> dict[str, Exported]:
    """The tensors serving every bit-width of ``bits_set`` from one artifact (``storage_bits_total_of``)."""
    bits_set = tuple(bits_set)
    return _walk_export(model, "", lambda m: _layer_tensors(m, "export_tensors_total", "storage_bits_total",
                                                             bits_set))


def _walk_load(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], load: str, arg: Any) -> None:
    if hasattr(module, "storage_bits"):
        mine = take_prefixed(tensors, prefix)
        if hasattr(module, load):
            try:
                getattr(module, load)(mine, arg)
            except KeyError as exc:  # a layer reads the names it exported
                raise MbqError(f"the file has no tensor {prefix}{exc.args[0]}; was it exported for another model "
                               f"or bit-width?") from exc
        elif mine:
            raise MbqError(f"the file holds {sorted(mine)[0]!r} for {type(module).__name__} at {prefix!r}, which "
                           f"loads nothing")
        return
    for name in plain_tensors(module):
        if prefix + name not in tensors:
            raise MbqError(f"the file has no tensor {prefix + name!r}; was it exported for another model?")
        assign_tensors(module, {name: tensors.pop(prefix + name)})
    for name, child in module.named_children():
        _walk_load(child, f"{prefix}{name}.", tensors, load, arg)


def _load(model: nn.Module, tensors: Mapping[str, torch.Tensor], load: str, arg: Any) -> None:
    remaining = dict(tensors)
    with torch.no_grad():
        _walk_load(model, "", remaining, load, arg)
    if remaining:
        raise MbqError(f"the file holds {len(remaining)} tensor(s) this model has no place for, e.g. "
                       f"{sorted(remaining)[0]!r}; was it exported for another model?")


def load_model(model: nn.Module, tensors: Mapping[str, torch.Tensor], bits: int) -> None:
    """Make ``model`` serve ``bits`` from the tensors :func:`export_model` wrote (every one must find its place)."""
    _load(model, tensors, "load_exported", bits)


def load_model_total(model: nn.Module, tensors: Mapping[str, torch.Tensor], bits_set: Iterable[int]) -> None:
    """Make ``model`` serve every bit-width of ``bits_set`` from what :func:`export_model_total` wrote."""
    _load(model, tensors, "load_exported_total", tuple(bits_set))


def export_tensors(method: Method, model: nn.Module, bits: int | tuple[int, ...]) -> dict[str, Exported]:
    """``method``'s export of ``model`` at ``bits`` (an int) or of the whole set ``bits`` (a tuple), checked against
    the storage the tables report: ``storage`` / ``storage_total`` bytes equal the payload bits // 8."""
    if isinstance(bits, tuple):
        tensors, counted = method.export_tensors_total(model, bits), method.storage_total(model, bits)
    else:
        tensors, counted = method.export_tensors(model, bits), method.storage(model, bits)
    if payload_bits(tensors) // 8 != counted:
        raise ExportMismatch(f"{method.name} exports {payload_bits(tensors) // 8} payload bytes at bits {bits}, but "
                             f"its storage counts {counted}")
    return tensors


# -- files ------------------------------------------------------------------------------------------------------------
def data_header(info: DatasetInfo) -> dict[str, Any]:
    """What a rebuilt network needs to know of its data set: input shape and normalization."""
    return {"name": info.name, "in_chans": info.in_chans, "image_size": info.image_size, "mean": list(info.mean),
            "std": list(info.std)}


def write_export(path: Path, tensors: Mapping[str, Exported], header: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``tensors`` (codes packed) and ``header`` to ``path`` atomically; returns the full header written."""
    from safetensors.torch import save

    from harness.store import atomic_write_bytes

    arrays: dict[str, torch.Tensor] = {}
    codes: dict[str, dict[str, Any]] = {}
    for name, value in sorted(tensors.items()):
        if isinstance(value, Codes):
            arrays[name] = pack_codes(value.values, value.bits)
            codes[name] = {"bits": value.bits, "shape": list(value.values.shape)}
        elif value.is_floating_point():
            # a copy of its own: safetensors refuses tensors that share memory (slices of one weight)
            arrays[name] = value.detach().to("cpu", torch.float32).contiguous().clone()
        else:
            raise ValueError(f"exported tensor {name!r} is {value.dtype}; integers must be Codes")
    bits = payload_bits(tensors)
    full = {**header, "format": FORMAT_VERSION, "codes": codes, "payload_bits": bits, "payload_bytes": bits // 8}
    atomic_write_bytes(Path(path), save(arrays, metadata={HEADER_KEY: json.dumps(full, sort_keys=True)}))
    return full


def _open(path: Path):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MbqError(f"{path} does not exist")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # noqa: BLE001 - whatever safetensors raises, the file is not one of ours
        raise MbqError(f"{path} is not a safetensors file ({type(exc).__name__}: {exc})") from exc


def _header(handle, path: Path) -> dict[str, Any]:
    try:
        header = json.loads((handle.metadata() or {})[HEADER_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise MbqError(f"{path} has no mbqbench header; it was not written by `cli.py export`") from exc
    if header.get("format") != FORMAT_VERSION:
        raise MbqError(f"{path} is export format {header.get('format')!r}; this version reads {FORMAT_VERSION}")
    return header


def file_payload_bits(path: Path) -> int:
    """The payload of an exported file, from its tensors' shapes and dtypes and the code bit-widths in its header
    (packed tensors: codes x bits, padding excluded; float32 tensors: 32 bits per value)."""
    with _open(path) as handle:
        codes = _header(handle, path)["codes"]
        total = 0
        for name in handle.keys():
            piece = handle.get_slice(name)
            shape, dtype = piece.get_shape(), piece.get_dtype()
            if name in codes:
                count = math.prod(codes[name]["shape"])
                if dtype != "U8" or shape != [math.ceil(count * codes[name]["bits"] / 8)]:
                    raise MbqError(f"{path}: packed tensor {name!r} is {dtype} {shape}, not its codes' bytes")
                total += count * codes[name]["bits"]
            elif dtype == "F32":
                total += math.prod(shape) * FLOAT_BITS
            else:
                raise MbqError(f"{path}: tensor {name!r} is {dtype}; an export holds float32 and packed codes only")
    return total


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of an exported file (codes unpacked to int64 in their shapes) and its header."""
    with _open(path) as handle:
        header = _header(handle, path)
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for name, info in header["codes"].items():
        shape = tuple(info["shape"])
        tensors[name] = unpack_codes(tensors[name], info["bits"], math.prod(shape)).view(shape)
    return tensors, header


def exported_method(header: Mapping[str, Any]) -> Method:
    """The configured method an exported file was written by (its ``set_bits`` switches a loaded ``all`` model)."""
    from harness.train import instantiate

    return instantiate(header["method"])


def _header_info(header: Mapping[str, Any]) -> DatasetInfo:
    from harness.data import DatasetInfo

    data = header["data"]
    return DatasetInfo(data["name"], header["num_classes"], data["in_chans"], data["image_size"], tuple(data["mean"]),
                       tuple(data["std"]), "none")


@torch.no_grad()
def forget_state(model: nn.Module) -> None:
    """NaN in every parameter and persistent floating-point buffer: what a loader does not overwrite from the file
    cannot pass for a trained value."""
    for module in model.modules():
        for tensor in plain_tensors(module).values():
            tensor.fill_(math.nan)


def load_exported(path: Path) -> tuple[nn.Module, int | tuple[int, ...], dict[str, Any]]:
    """Rebuild the network an export serves, from the file alone: ``(model, bits, header)``, the model in eval mode
    at ``bits`` (for an ``all`` file, ``bits`` is the set and the model is at its highest bit-width; switch with
    ``exported_method(header).set_bits(model, b)``)."""
    tensors, header = read_export(path)
    method = exported_method(header)
    with torch.random.fork_rng(devices=[]):  # building initializes weights; the caller's random stream stays put
        model = method.build(header["model"], header["num_classes"], tuple(header["trained_bits"]),
                             _header_info(header), header["width"])
    forget_state(model)
    if header["bits"] == ALL_BITS:
        bits: int | tuple[int, ...] = tuple(header["bits_set"])
        method.load_exported_total(model, tensors, bits)
        method.set_bits(model, max(bits))
    else:
        bits = int(header["bits"])
        method.load_exported(model, tensors, bits)
        method.set_bits(model, bits)
    return model.eval(), bits, header
