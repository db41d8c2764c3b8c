"""Shared fixtures: tiny checkpoints of each family, built once per test session, and the
whole-stack tier's one stack (tests/stack_tier.py), started once per session; the order
the tiers run in."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (replicas/kernels/) run on CPU in Triton's interpreter for the
    # tests that ask for them; read when the kernels are defined, so set before imports
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist (-n N): the workers share the cores instead of each taking all of them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(
        os.environ["PYTEST_XDIST_WORKER_COUNT"])))
import stack_tier  # noqa: E402
from checkpoints import CheckpointFactory, make_checkpoint  # noqa: E402

# the phases of the shared stack's life, in order (tests/stack_tier.py): `stack` alone,
# `stack("faults")`, `stack("stops")`
STACK_PHASES = ("", "faults", "stops")


# modules that start a Ray of their own without the marker yet (their own Ray, for now;
# they can move onto the shared stack): in the whole-stack tier all the same
STACK_MODULES: tuple[str, ...] = ()  # (test_router.py, test_cluster.py: on the shared stack)


def tier_order(item: pytest.Item) -> tuple[int, int, int]:
    """Where a test runs: the fast tier first, then the whole-stack tier (marker `stack`):
    the tests on the shared stack, phase by phase (the last phase stops it), then the tests
    that start a Ray of their own. So two Rays never start at once: on a busy 2-core
    machine a second Ray starting beside another misses Ray's fixed waits (its raylet
    aborts when its dashboard agent takes over 15 s to start: "The current node timed out
    during startup"; CI saw `ray up` fail so, and the Ctrl-C test's Ray, when they started
    beside the shared stack's tests; `tpserve up` and `ray up`'s nodes now start such a
    Ray again)."""
    mark = item.get_closest_marker("stack")
    if mark is None:
        return (0, 0, 0)
    if "shared_stack" not in getattr(item, "fixturenames", ()):
        return (1, 1, 0)
    return (1, 0, STACK_PHASES.index(mark.args[0] if mark.args else ""))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--start-shared-stack", action="store_true",
        help="start the whole-stack tier's shared stack before collecting, so that it comes "
             "up while pytest collects (infra/test.sh's whole-stack run); without it, the "
             "stack starts once collection shows a selected test that uses it")


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM ends the run as Ctrl-C does (the session's end still stops the shared
    stack; a CI runner that cancels a job sends one). With --start-shared-stack, the shared
    stack starts now."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # (a worker is its controller's business)
        return
    signal.signal(signal.SIGTERM, interrupted)
    if config.getoption("--start-shared-stack") and not config.option.collectonly:
        STARTING.append(stack_tier.start_in_background())


def interrupted(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: a second one must not cut the clean-up
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark STACK_MODULES' tests `stack` (so `-m "not stack"` leaves them out), then order
    the tiers (stable: within a phase, the files' own order)."""
    for item in items:
        if item.path.name in STACK_MODULES and item.get_closest_marker("stack") is None:
            item.add_marker(pytest.mark.stack)
    items.sort(key=tier_order)


def pytest_collection_finish(session: pytest.Session) -> None:
    """When a selected test uses the shared stack, start it now (unless
    --start-shared-stack started it already), in the background: it comes up while the
    tests before it run (the fast tier, when one run selects both)."""
    if session.config.option.collectonly or STARTING or not any(
            "shared_stack" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker would start a stack of its own
        raise pytest.UsageError("the whole-stack tier runs in one process: no -n")
    STARTING.append(stack_tier.start_in_background())


def too_few_gpus(error: BaseException) -> str | None:
    """Why a test cannot run here, when `error` is the engine's refusal of a tp larger
    than the GPUs this process sees (and it does see fewer), else None. The CPU tier's
    tp > 1 tests take the default device: CUDA wherever one is visible, so on a one-GPU
    machine their tp=2 engines are refused; there they are skipped, saying so, and on a
    machine with no GPU or enough of them they run."""
    from replicas.config import TooFewGPUs

    if not isinstance(error, TooFewGPUs):
        return None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 < visible < error.tp:
        return None
    return f"{error} (this machine: {visible} GPU{'s' if visible > 1 else ''})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    """A test whose engine asks for more GPUs than this machine has (too_few_gpus) is
    reported skipped, with the engine's message, not failed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    reason = too_few_gpus(call.excinfo.value) if call.excinfo is not None else None
    if reason is not None and report.failed:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop what the `stack("stops")` tests did not stop (failed, not selected, or a run
    cut short), by pid."""
    for starting in STARTING:
        stack_tier.stop_in_background(starting)


STARTING: list[stack_tier.Starting] = []


@pytest.fixture(scope="session")
def shared_stack() -> stack_tier.Running:
    """`tpserve up --detach` in an empty HOME on free ports, once per session (started when
    the tests were collected; this waits until it is up)."""
    assert STARTING, "the shared stack was not started (pytest_collection_finish)"
    return STARTING[0].running()


class ImportsStayFrozen:
    """replicas.worker's `gc` in the tests' processes (`frozen_imports`): the collector,
    but `unfreeze` leaves the heap the session froze frozen."""

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)

    @staticmethod
    def unfreeze() -> None:
        pass


@pytest.fixture(scope="session", autouse=True)
def frozen_imports() -> Iterator[None]:
    """A test process freezes its heap once, as it is when its tests begin (pytest's,
    every test module's imports), as `freeze_heap` does in a serving process; engines
    started in it neither collect and freeze at start (`freeze_heap`) nor unfreeze at
    shutdown (`Worker.release`, which still collects what they allocated). Each engine's
    two full collections of a test process's heap took 0.5-0.8 s, ~200 CPU-seconds of the
    fast tier's ~170 engines. Rank processes and engine children freeze as in service;
    tests/test_engine.py's freeze test takes both back."""
    import replicas.engine
    import replicas.worker

    gc.collect()
    gc.freeze()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(replicas.engine, "freeze_heap", lambda: None)
            patch.setattr(replicas.worker, "gc", ImportsStayFrozen())
            yield
    finally:
        gc.unfreeze()


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


@pytest.fixture(scope="session")
def overflowing_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with o_proj scaled so its all-reduced output exceeds float16's
    range (65504): float16 communication must overflow on every step."""
    import shutil

    from safetensors.torch import load_file, save_file

    from replicas.tiny import tiny_model_dir

    path = tmp_path_factory.mktemp("overflow") / "model"
    shutil.copytree(tiny_model_dir(), path)
    tensors = load_file(path / "model.safetensors")
    for name in tensors:
        if name.endswith("o_proj.weight"):
            tensors[name] = tensors[name] * 1e6
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)
