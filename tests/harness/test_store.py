"""Run folders: checkpoints load without running pickled code, and files follow the user's umask."""

from __future__ import annotations

import io
import os
import stat

import pytest
import torch

from harness.errors import MbqError
from harness.store import RunStore, atomic_write_text

RAN: list[str] = []


def run_code(marker: str) -> str:
    RAN.append(marker)
    return marker


class RunsCode:
    """Unpickling this calls :func:`run_code`: a stand-in for arbitrary code."""

    def __reduce__(self):
        return (run_code, ("ran",))


def test_a_checkpoint_holding_a_crafted_pickle_is_refused_in_one_line(tmp_path):
    RAN.clear()
    store = RunStore(tmp_path)
    path = store.checkpoint_path("emq", 0)
    path.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "payload": RunsCode()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(MbqError, match="holds Python objects besides tensors and plain data and was refused") as err:
        store.load_checkpoint("emq", 0)
    assert "\n" not in str(err.value)
    assert RAN == []  # nothing ran
    torch.load(path, weights_only=False)  # the crafted file does run code where pickle is trusted
    assert RAN == ["ran"]


def test_a_truncated_checkpoint_is_corrupt(tmp_path):
    store = RunStore(tmp_path)
    store.save_checkpoint("emq", 0, {"epoch": 1, "model": {"w": torch.ones(3)}})
    path = store.checkpoint_path("emq", 0)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(MbqError, match="is corrupt .*delete it to restart"):
        store.load_checkpoint("emq", 0)


def test_checkpoints_of_tensors_and_plain_data_round_trip(tmp_path):
    store = RunStore(tmp_path)
    state = {"epoch": 2, "passes": {2: 10, 8: 10}, "log": [{"loss": 1.5}], "model": {"w": torch.arange(4.0)}}
    store.save_checkpoint("emq", 0, state)
    loaded = store.load_checkpoint("emq", 0)
    assert loaded["passes"] == {2: 10, 8: 10} and torch.equal(loaded["model"]["w"], torch.arange(4.0))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "table.md", "x")
        RunStore(tmp_path).save_checkpoint("emq", 0, {"epoch": 0})
    finally:
        os.umask(previous)
    for path in (tmp_path / "table.md", RunStore(tmp_path).checkpoint_path("emq", 0)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
