"""Which native list operators answered: a context manager the native weight-list tests share."""

import contextlib
from collections.abc import Iterator

from methods.quant import native


@contextlib.contextmanager
def recording_list_loop() -> Iterator[list[tuple[str, bool]]]:
    """``native.list_loop`` wrapped inside the block: each call appends ``(operator name, whether it answered)`` to
    the list it yields (False: the caller's list operations ran)."""
    answered: list[tuple[str, bool]] = []
    original = native.list_loop

    def recording(name, *operands):
        result = original(name, *operands)
        answered.append((name, result is not None))
        return result

    native.list_loop = recording
    try:
        yield answered
    finally:
        native.list_loop = original
