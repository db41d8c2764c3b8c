"""The device scripts (infra/device_*.sh) run only on a lent GPU machine, where a typo
costs a call of a 30-minute budget: their syntax, and the helpers that turn settings into
flags, are checked here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parent.parent / "infra"


@pytest.mark.parametrize("script", sorted(p.name for p in INFRA.glob("device_*.sh")))
def test_device_script_parses(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(INFRA / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def engine_flags(ab_engine: str, *args: str) -> list[str]:
    """device_stack.sh's engine_flags, alone, with AB_ENGINE set."""
    script = (f"source <(sed -n '/^engine_flags() {{/,/^}}/p' {INFRA / 'device_stack.sh'}); "
              f"engine_flags {' '.join(args)}")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                          env={"AB_ENGINE": ab_engine, "PATH": "/usr/bin:/bin"})
    return done.stdout.split()


def test_ab_engine_becomes_gpu_stack_sets_and_tpserve_up_flags() -> None:
    """AB_ENGINE='FIELD=VALUE ...': `gpu_stack engine --set FIELD=VALUE` for the engine
    alone, `tpserve up --field-name VALUE` for the stack; both parse."""
    from infra import cli

    settings = "piece_graph_tokens=512 stream_interval=2"
    sets = engine_flags(settings, "--set")
    assert sets == ["--set", "piece_graph_tokens=512", "--set", "stream_interval=2"]
    ups = engine_flags(settings)
    assert ups == ["--piece-graph-tokens", "512", "--stream-interval", "2"]
    argv = ["up", *ups]
    args = cli.build_parser(cli.command_of(argv)).parse_args(argv)
    assert (args.piece_graph_tokens, args.stream_interval) == (512, 2)
