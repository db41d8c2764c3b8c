"""Shared fixtures: tiny checkpoints of each family, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (replicas/kernels/) run on CPU in Triton's interpreter for the
    # tests that ask for them; read when the kernels are defined, so set before imports
    os.environ.setdefault("TRITON_INTERPRET", "1")
from checkpoints import CheckpointFactory, make_checkpoint


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
