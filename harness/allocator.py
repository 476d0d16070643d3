"""Keep large freed blocks in the process (glibc malloc) so a training loop's big tensors reuse warm pages.

glibc serves an allocation above its mmap threshold (dynamic, capped at 32 MB on 64-bit systems) with a fresh
``mmap`` and returns it to the kernel on free; its heap is trimmed back whenever more than the trim threshold is
free at the top. A tensor of that size made once per step (an ImageNet batch of 64 x 3 x 224 x 224 float32 is
38.5 MB) therefore page-faults and zero-fills every one of its pages each time it is made. Measured on 2 AMD EPYC
cores: ``uint8 batch -> float32 / 255`` of that batch took 44 ms with glibc's defaults and 8 ms with both
thresholds at 1 GiB, where the freed block is reused; the folder loader's training process spends most of its
time there.

``keep_large_blocks()`` sets both thresholds with ``mallopt`` (the same as ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` in the environment at start). The cost is that memory freed by the process is kept for
reuse rather than returned to the kernel: its resident size stays at its peak. It does nothing where malloc is not
glibc's, or where the environment already chooses either threshold (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``): set them there to override.

DataLoader workers started by ``fork`` inherit the setting and, with it, the training process's heap of kept
blocks as copy-on-write pages: a worker that reuses one of those blocks for a decoded image copies every page it
writes, and the training process copies the pages it writes while the workers share them. ``release_in_worker()``
(each folder-loader worker's first call) trims the inherited free blocks so a worker writes fresh pages instead.
Measured on 2 idle Xeon cores (the loader benchmark's synthetic ImageNet at 2 workers, in a process that had kept
1.3 GB of freed tensors and made 120 MB of tensors per batch, as a training step does): 837 images/s with it
against 767 without, mean of 6 epochs each, higher in each of the 6 paired epochs.

The worker's thresholds matter as much. glibc's documented defaults (128 KiB) are only starting points: glibc raises
the mmap threshold to the size of each mmapped block it frees, up to 32 MiB, so a process that makes the same
half-megabyte image again and again soon serves it from warm heap pages. Setting a threshold with ``mallopt`` turns
that rule off, and a worker that had put back the fixed 128 KiB mapped and faulted in every decoded 500x375 image
(562 KB) and every resampling buffer afresh. A worker therefore sets the values the dynamic rule ends at
(``WORKER_MMAP_THRESHOLD``, ``WORKER_TRIM_THRESHOLD``). Measured on 2 idle Xeon cores, the loader benchmark's epoch at
2 workers with the float conversion left out (so the workers' decoding alone sets the rate): about 1,050 images/s
with the fixed 128 KiB, about 1,300 with these values, and 1,270-1,300 in a process that never called
``keep_large_blocks`` (glibc's own rule).
"""

from __future__ import annotations

import ctypes
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LARGE_BLOCK_BYTES = 1 << 30
M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
BATCH_ALIGNMENT = 64  # bytes, as torch's own CPU allocator aligns
# A worker cannot get glibc's dynamic mmap threshold back (any mallopt fixes it), so it takes the values that rule
# grows to on 64-bit systems: blocks up to 32 MiB come from the heap and the heap is trimmed above twice that.
WORKER_MMAP_THRESHOLD = 32 * 1024 * 1024
WORKER_TRIM_THRESHOLD = 2 * WORKER_MMAP_THRESHOLD

_kept = False  # whether keep_large_blocks() changed this process's thresholds (inherited across fork)

ENVIRONMENT_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): nothing to set
        return None
    return libc


def environment_chooses_thresholds() -> bool:
    return any(name in os.environ for name in ENVIRONMENT_SETTINGS) or "glibc.malloc" in os.environ.get(
        "GLIBC_TUNABLES", "")


def keep_large_blocks(limit_bytes: int = LARGE_BLOCK_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to ``limit_bytes``; True where both took effect."""
    global _kept
    libc = None if environment_chooses_thresholds() else _glibc()
    if libc is None:
        return False
    _kept = bool(libc.mallopt(M_MMAP_THRESHOLD, limit_bytes)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit_bytes))
    return _kept


def release_in_worker(worker_id: int | None = None) -> bool:
    """In a forked worker: hand the inherited free blocks back and cap the thresholds at what glibc's own dynamic
    rule would reach (``WORKER_MMAP_THRESHOLD``, ``WORKER_TRIM_THRESHOLD``); True if it did.

    ``worker_id`` makes it usable as a DataLoader ``worker_init_fn``.
    """
    global _kept
    libc = _glibc() if _kept else None
    if libc is None:
        return False
    libc.mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _kept = False
    return True


def reusable_empty(shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized CPU tensor (float32 by default) in memory from plain ``malloc``, 64-byte aligned.

    torch's CPU allocator asks for 64-byte alignment (``posix_memalign``), and glibc serves every aligned request
    from a free block a little larger than the request, splitting the slack off as slivers. A freed batch-sized
    block is therefore too small for the next same-sized aligned request unless the slivers around it are still
    free to merge with it, and in a training process that receives a batch and makes small objects (a pickled
    message, an index tensor) between two batches, they rarely are. Then every batch extends the heap and faults
    in all its pages afresh, ``keep_large_blocks`` notwithstanding: the folder loader's training process at 2
    workers took 300,000-440,000 minor faults per 3,000-image epoch in some runs and 25,000-45,000 in others.
    A plain ``malloc`` (numpy's allocator) of a fixed size fits exactly in the block the previous one freed; the
    alignment comes from starting the tensor at the right offset inside it (torch's kernels need no more).
    """
    import numpy as np
    import torch

    dtype = torch.float32 if dtype is None else dtype
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + BATCH_ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % BATCH_ALIGNMENT
    return torch.from_numpy(raw[offset:offset + nbytes]).view(dtype).view(shape)
