"""Shared fixtures: tiny checkpoints of each family, built once per test session, and the
whole-stack tier's one stack (tests/stack_tier.py), started once per session; the order
the tiers run in."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (replicas/kernels.py) run on CPU in Triton's interpreter for the
    # tests that ask for them; read when the kernels are defined, so set before imports
    os.environ.setdefault("TRITON_INTERPRET", "1")
import stack_tier  # noqa: E402
from checkpoints import CheckpointFactory, make_checkpoint  # noqa: E402

# the phases of the shared stack's life, in order (tests/stack_tier.py): `stack` alone,
# `stack("faults")`, `stack("stops")`
STACK_PHASES = ("", "faults", "stops")


# modules that start a Ray of their own without the marker yet (their own Ray, for now;
# they can move onto the shared stack): in the whole-stack tier all the same
STACK_MODULES = ("test_router.py", "test_cluster.py")


def tier_order(item: pytest.Item) -> tuple[int, int, int]:
    """Where a test runs: the fast tier first, then the whole-stack tier (marker `stack`):
    the tests with processes of their own, then those on the shared stack, phase by
    phase."""
    mark = item.get_closest_marker("stack")
    if mark is None:
        return (0, 0, 0)
    phase = STACK_PHASES.index(mark.args[0] if mark.args else "")
    return (1, int("shared_stack" in getattr(item, "fixturenames", ())), phase)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark STACK_MODULES' tests `stack` (so `-m "not stack"` leaves them out), then order
    the tiers (stable: within a phase, the files' own order)."""
    for item in items:
        if item.path.name in STACK_MODULES and item.get_closest_marker("stack") is None:
            item.add_marker(pytest.mark.stack)
    items.sort(key=tier_order)


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack_tier.Running]:
    """`tpserve up --detach` in an empty HOME on free ports, once per session; what the
    `stack("stops")` tests did not stop is stopped at the end."""
    running = stack_tier.start(tmp_path_factory.mktemp("stack-home"))
    try:
        yield running
    finally:
        stack_tier.stop(running)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """`checkpoint(family, **options)` -> directory; the same arguments give the same
    directory, built once per session (see tests/checkpoints.py for the options)."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[tuple[Any, ...], str] = {}

    def get(family: str, **options: Any) -> str:
        key = (family, *sorted(options.items()))
        if key not in built:
            name = "-".join([family] + [f"{k}={v}" for k, v in sorted(options.items())])
            built[key] = make_checkpoint(family, Path(root) / name, **options)
        return built[key]

    return get
