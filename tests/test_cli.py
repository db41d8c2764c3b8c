"""The `tpserve` command line is built from the config dataclasses: every field is a flag
and each default comes from the dataclass (one place), except where a command says so.
Switches turn off with --no-x; every flag says what it does; no `--help` imports torch or
Ray, and `tpserve --help` answers in well under a second."""

from __future__ import annotations

import argparse
import dataclasses
import resource
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from probes import loaded_after, run_probe

from infra.cli import (
    COMMANDS,
    FIELD_HELP,
    build_parser,
    config_from_args,
    engine_fields,
    main,
)
from infra.stack import NOT_RUNNING, StackConfig

REPO = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "ray", "transformers"}


def engine_config() -> type:
    pytest.importorskip("torch")
    from replicas import EngineConfig

    return EngineConfig


def test_up_flags_mirror_the_config_fields() -> None:
    EngineConfig = engine_config()
    args = build_parser().parse_args(["up"])
    engine = config_from_args(args, EngineConfig)
    stack = config_from_args(args, StackConfig)
    assert engine == dataclasses.replace(EngineConfig(), tp=2)  # the stack's TP=2 default
    assert stack == StackConfig()


def test_engine_flags_read_from_the_source_are_the_engine_config_fields() -> None:
    EngineConfig = engine_config()
    read = engine_fields()
    assert read is not EngineConfig  # read from the source, torch not imported for it
    assert [(f.name, f.default) for f in dataclasses.fields(read)] == [
        (f.name, f.default) for f in dataclasses.fields(EngineConfig)]
    assert typing.get_type_hints(read) == typing.get_type_hints(EngineConfig)


def test_flags_are_typed_and_reach_the_config() -> None:
    EngineConfig = engine_config()
    args = build_parser().parse_args(["up", "--tp", "4", "--replicas", "3", "--comm-dtype",
                                      "bfloat16", "--max-model-len", "1024", "--detach"])
    engine = config_from_args(args, EngineConfig)
    assert (engine.tp, engine.comm_dtype, engine.max_model_len) == (4, "bfloat16", 1024)
    assert config_from_args(args, StackConfig).replicas == 3 and args.detach


def test_generate_keeps_the_engine_defaults() -> None:
    EngineConfig = engine_config()
    args = build_parser().parse_args(["generate"])
    assert config_from_args(args, EngineConfig) == EngineConfig()


SWITCHES = ("cuda_graphs", "shm_all_reduce", "async_scheduling", "gemv_kernels")


@pytest.mark.parametrize("command", ["up", "generate"])
def test_boolean_flags_turn_off_with_no_and_on_again(command: str) -> None:
    parser = build_parser(command)
    defaults = parser.parse_args([command])
    assert all(getattr(defaults, name) is True for name in SWITCHES)
    off = parser.parse_args([command] + [f"--no-{n.replace('_', '-')}" for n in SWITCHES])
    assert all(getattr(off, name) is False for name in SWITCHES)
    on = parser.parse_args([command, "--no-cuda-graphs", "--cuda-graphs"])  # the last wins
    assert on.cuda_graphs is True


@pytest.mark.parametrize("value", ["False", "0", "no"])
def test_a_value_after_a_switch_is_refused_not_read_as_true(value: str) -> None:
    with pytest.raises(SystemExit):  # type=bool made "False" True; now it is an error
        build_parser("up").parse_args(["up", "--cuda-graphs", value])


def test_switches_reach_the_engine_config() -> None:
    EngineConfig = engine_config()
    args = build_parser().parse_args(["up", "--no-cuda-graphs", "--no-shm-all-reduce",
                                      "--no-async-scheduling"])
    engine = config_from_args(args, EngineConfig)
    assert (engine.cuda_graphs, engine.shm_all_reduce, engine.async_scheduling) == (
        False, False, False)


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_flag_has_a_help_sentence() -> None:
    parsers = subcommand_parsers()
    assert set(parsers) == set(COMMANDS)
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            sentence = (action.help or "").split("(default:")[0].strip()
            assert len(sentence.split()) >= 3, (name, action.option_strings, action.help)
    for cls in (engine_fields(), StackConfig):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in FIELD_HELP]
        assert not missing, f"no FIELD_HELP sentence for {missing}"


def help_text(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "infra.cli", *argv, "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_describes_tpserve_for_a_user_and_hides_the_home_path() -> None:
    top = help_text()
    assert top.splitlines()[2].startswith("tpserve serves Hugging Face")
    assert "main()" not in top and "parses and calls" not in top
    for command in COMMANDS:
        assert command in top
    for command in ("up", "status", "down"):
        text = help_text(command)
        assert "(default: ~/.tpserve/stack)" in " ".join(text.split())
        assert str(Path.home()) + "/" not in text
    assert "--no-cuda-graphs" in help_text("up")


@pytest.mark.parametrize("argv", [["--help"], ["up", "--help"], ["generate", "--help"],
                                  ["status", "--help"], ["down", "--help"],
                                  ["scale", "--help"], ["nginx", "--help"]])
def test_help_imports_neither_torch_nor_ray(argv: list[str]) -> None:
    done, loaded = run_probe("import sys\nfrom infra import cli\ntry:\n"
                             "    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass", *argv,
                             timeout=60)
    assert "usage:" in done.stdout  # (the help was printed)
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_ups_engine_config_and_the_apps_build_import_no_torch() -> None:
    """`tpserve up` (its engine config, the stack's free ports) and the Serve app's build
    task (cluster/app.py: `from replicas import EngineConfig`) read the engine's config
    without torch, which only the engine's own processes import (~4 s of CPU each time
    otherwise). (Ray's import is left out: it is not the point, and at nice 19 beside the
    whole-stack tier CI once starved this probe past 120 s with it.)"""
    loaded = loaded_after("import infra.stack\n"
                          "from replicas import EngineConfig\n"
                          "from replicas.engineproc import EngineProcess\n"
                          "EngineConfig(tp=2, dtype='bfloat16').to_dict(); "
                          "infra.stack.on_free_ports()", timeout=600)
    assert not loaded & {"torch", "transformers"}, loaded


def test_tpserve_help_answers_in_under_a_second() -> None:
    """`tpserve --help` does under a second of work (no Ray or torch import: those take
    several). Measured as the child's CPU time, best of three: its wall time on a 2-core
    CI machine busy with the other tests measures the machine (2.7 s there once, 0.2-0.5
    s idle on the same machine)."""
    times = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        help_text()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    assert min(times) < 1.0, times


def test_status_with_nothing_running_says_so_in_its_own_words(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", f"--state-dir={tmp_path}"]) == NOT_RUNNING
    said = capsys.readouterr()
    assert "tpserve is not running" in said.out and "tpserve up" in said.out
    assert main(["down", f"--state-dir={tmp_path}"]) == 1
    down_said = capsys.readouterr().err
    assert "no stack is recorded" in down_said and "tpserve is not running" not in down_said


def test_router_settings_reach_the_router_config() -> None:
    pytest.importorskip("ray")
    from cluster.control import load_config
    from infra.stack import StackError
    from router.app import RouterConfig

    args = build_parser().parse_args(["up", "--routing", "random", "--sessions", "always",
                                      "--rate-limit-per-minute", "600"])
    stack = config_from_args(args, StackConfig)
    assert (stack.routing, stack.sessions, stack.rate_limit_per_minute) == (
        "random", "always", 600)
    serve_yaml = REPO / "cluster" / "serve.yaml"
    app = load_config(serve_yaml, router=stack.router)["applications"][0]
    router = RouterConfig(**app["args"]["router"])
    assert (router.routing, router.sessions, router.rate_limit_per_minute) == (
        "random", "always", 600)
    defaults = RouterConfig(**load_config(serve_yaml)["applications"][0]["args"]["router"])
    assert (defaults.sessions, defaults.rate_limit_per_minute) == (
        StackConfig().sessions, StackConfig().rate_limit_per_minute) == ("on_use", 0)
    for bad in ({"routing": "sticky"}, {"sessions": "never"}, {"rate_limit_per_minute": -1},
                {"router_replicas": 0}):
        with pytest.raises(StackError):
            StackConfig(**bad)


def test_router_replicas_follow_the_cores_unless_given() -> None:
    """Unset, a stack runs one router replica per 4 cores (1 to 4: PERF.md v0.51's four on
    the H200 host's 16), and Ray hands out one logical CPU more for each beyond the
    first; given, both are as given."""
    from infra.stack import auto_router_replicas

    assert [auto_router_replicas(n) for n in (1, 2, 7, 8, 15, 16, 128)] == [1, 1, 1, 2, 3, 4, 4]
    config = StackConfig()
    assert config.router_replicas == auto_router_replicas()
    assert config.num_cpus == 7 + config.router_replicas
    assert (StackConfig(router_replicas=3, num_cpus=5).router_replicas,
            StackConfig(router_replicas=3, num_cpus=5).num_cpus) == (3, 5)
    assert StackConfig(router_replicas=2).num_cpus == 9
