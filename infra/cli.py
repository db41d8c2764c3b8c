"""`tpserve`: the command line. `main()` only parses and calls.

Options are generated from the config dataclasses' fields (EngineConfig, StackConfig),
so each default exists once. `tpserve up` starts the local stack (infra/stack.py);
`tpserve generate` runs the engine alone on one prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import types
import typing

from cluster.control import DEFAULT_DASHBOARD, ServeError, scale
from infra import nginx, stack
from infra.stack import StackConfig
from replicas import Engine, EngineConfig, SamplingParams


def add_config_arguments(parser: argparse.ArgumentParser, cls: type,
                         defaults: dict[str, typing.Any] | None = None) -> None:
    """One `--flag` per field of the dataclass `cls`, typed and defaulted from it (or from
    `defaults`, for a command whose default differs, like the stack's tp=2)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `int | None` -> int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = (defaults or {}).get(f.name, f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default,
                            help=f"(default: {default})")


def config_from_args(args: argparse.Namespace, cls: type) -> typing.Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def generate(config: EngineConfig, prompt: str, max_tokens: int) -> int:
    print(f"starting the engine: model={config.model or 'built-in tiny'} tp={config.tp}")
    started = time.perf_counter()
    with Engine(config) as engine:
        print(f"ready in {time.perf_counter() - started:.1f} s; {engine.stats()['num_kv_blocks']}"
              " KV blocks")
        out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]
    print(f"prompt: {prompt!r}\ncompletion: {out.text!r} ({len(out.token_ids)} tokens, "
          f"finish_reason={out.finish_reason})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the local stack: Ray, Serve (router + engine "
                          "replicas), Redis, nginx")
    add_config_arguments(p_up, EngineConfig, {"tp": 2})  # the local stack: TP=2 on CPU
    add_config_arguments(p_up, StackConfig)
    p_up.add_argument("--detach", action="store_true", help="return once up; `tpserve down` "
                      "stops it")
    for name, text in (("down", "stop a stack started with --detach"),
                       ("status", "replicas, health and URLs of the running stack")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", default=StackConfig.state_dir)
    p_gen = sub.add_parser("generate", help="run the engine alone on a prompt and print the "
                           "completion")
    add_config_arguments(p_gen, EngineConfig)
    p_gen.add_argument("--prompt", default="The capital of France is")
    p_gen.add_argument("--max-tokens", type=int, default=24)
    nginx.add_parser(sub)
    p_scale = sub.add_parser("scale", help="set the number of engine replicas (through Serve)")
    p_scale.add_argument("replicas", type=int)
    p_scale.add_argument("--dashboard", default=DEFAULT_DASHBOARD, help="Ray dashboard URL")
    p_scale.add_argument("--timeout-s", type=float, default=600.0)
    return parser


def scale_command(target: int, dashboard: str, timeout_s: float) -> int:
    try:
        running = scale(target, dashboard, timeout_s=timeout_s, progress=print)
    except ServeError as e:
        print(f"tpserve scale: {e}", file=sys.stderr)
        return 1
    print(f"{len(running)} engine replicas RUNNING: {', '.join(r.replica_id for r in running)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            engine = config_from_args(args, EngineConfig).to_dict()
            return stack.up(engine, config_from_args(args, StackConfig), args.detach)
        if args.command == "down":
            return stack.down(args.state_dir)
        if args.command == "status":
            return stack.status(args.state_dir)
    except stack.StackError as e:
        print(f"tpserve {args.command}: {e}", file=sys.stderr)
        return 1
    if args.command == "generate":
        return generate(config_from_args(args, EngineConfig), args.prompt, args.max_tokens)
    if args.command == "nginx":
        return nginx.run(args)
    if args.command == "scale":
        return scale_command(args.replicas, args.dashboard, args.timeout_s)
    return 2


if __name__ == "__main__":
    sys.exit(main())
