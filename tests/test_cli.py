"""The `tpserve` command line is built from the config dataclasses: every field is a flag
and each default comes from the dataclass (one place), except where a command says so."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("ray")
from infra.cli import build_parser, config_from_args  # noqa: E402
from infra.stack import StackConfig  # noqa: E402
from replicas import EngineConfig  # noqa: E402


def test_up_flags_mirror_the_config_fields() -> None:
    args = build_parser().parse_args(["up"])
    engine = config_from_args(args, EngineConfig)
    stack = config_from_args(args, StackConfig)
    assert engine == dataclasses.replace(EngineConfig(), tp=2)  # the stack's TP=2 default
    assert stack == StackConfig()


def test_flags_are_typed_and_reach_the_config() -> None:
    args = build_parser().parse_args(["up", "--tp", "4", "--replicas", "3", "--comm-dtype",
                                      "bfloat16", "--max-model-len", "1024", "--detach"])
    engine = config_from_args(args, EngineConfig)
    assert (engine.tp, engine.comm_dtype, engine.max_model_len) == (4, "bfloat16", 1024)
    assert config_from_args(args, StackConfig).replicas == 3 and args.detach


def test_generate_keeps_the_engine_defaults() -> None:
    args = build_parser().parse_args(["generate"])
    assert config_from_args(args, EngineConfig) == EngineConfig()


def test_routing_flag_reaches_the_router_config() -> None:
    from pathlib import Path

    from cluster.control import load_config
    from infra.stack import StackConfig, StackError
    from router.app import RouterConfig

    args = build_parser().parse_args(["up", "--routing", "random"])
    stack = config_from_args(args, StackConfig)
    assert stack.routing == "random"
    serve_yaml = Path(__file__).resolve().parent.parent / "cluster" / "serve.yaml"
    app = load_config(serve_yaml, router={"routing": stack.routing})["applications"][0]
    assert RouterConfig(**app["args"]["router"]).routing == "random"
    with pytest.raises(StackError, match="routing"):
        StackConfig(routing="sticky")
