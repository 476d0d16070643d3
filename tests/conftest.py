"""Shared fixtures: a tiny synthetic data set and run spec so method tests run in seconds on CPU."""

from __future__ import annotations

import pytest

from harness.config import RunSpec, Schedule
from harness.data import load_dataset


@pytest.fixture(scope="session")
def synthetic():
    return load_dataset("synthetic")


@pytest.fixture
def tiny_spec():
    def make(methods=("anyprecision",), bits=(2, 32), epochs=2, **kw) -> RunSpec:
        schedule = Schedule(epochs=epochs, batch_size=64, lr=0.05, **kw.pop("schedule", {}))
        return RunSpec(methods=tuple(methods), dataset="synthetic", model="resnet20", width=0.25, bits=tuple(bits),
                       schedule=schedule, train_subset=kw.pop("train_subset", 192), device="cpu", **kw)

    return make
