"""`tpserve`: the command line. `main()` only parses and calls.

Options are generated from the config dataclasses' fields (EngineConfig, StackConfig),
so each default exists once; FIELD_HELP gives each of them its sentence (a test checks
that no field goes without). Imports are lazy: only the command being run builds its
flags and imports what it needs, so no `--help`, nor `status`, `down`, `scale` or `nginx`,
imports torch or Ray (the engine's flags are read from its config's source:
`engine_fields`); `up` and `generate` import the engine when they run.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import operator
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path

DESCRIPTION = """\
tpserve serves Hugging Face causal language models on Ray: tensor-parallel engine
replicas behind an OpenAI-compatible API, each user's session pinned to one replica,
and a dashboard. `tpserve up` starts a complete local cluster on this machine (the
built-in tiny model on CPU unless you pass --model)."""

EPILOG = """\
examples:
  tpserve up                     start the local cluster; Ctrl-C stops it
  tpserve up --detach            start it in the background; `tpserve down` stops it
  tpserve status                 replicas, scaling target, health and URLs
  tpserve scale 3                run 3 engine replicas
  tpserve up --help              every setting of the cluster and the engine"""

COMMANDS = {
    "up": "start the local cluster: Ray, the Serve app (router and engine replicas), Redis "
          "and nginx",
    "down": "stop the cluster that `tpserve up --detach` started",
    "status": "show the running cluster: its replicas, scaling target, health and URLs",
    "scale": "set the number of engine replicas (Serve starts new ones or drains old ones)",
    "generate": "run the engine alone on one prompt and print the completion",
    "nginx": "print the nginx config of the edge in front of the Serve proxies",
}

# One sentence per config field, shown by `--help` with the field's default.
FIELD_HELP = {
    # EngineConfig (replicas/config.py)
    "model": "Directory of a Hugging Face checkpoint (config.json, tokenizer and "
             "*.safetensors); not set: the built-in tiny model.",
    "tp": "Tensor-parallel size: the GPUs (or CPU processes) that one engine replica spans.",
    "dtype": "Weight and activation dtype: auto (the checkpoint's), float32, float16 or "
             "bfloat16.",
    "comm_dtype": "Dtype of the all-reduce payloads between ranks: auto (the model's own "
                  "16-bit dtype), float16, bfloat16 or float32.",
    "max_model_len": "Longest prompt plus completion, in tokens; not set: the model's own "
                     "limit.",
    "kv_cache_memory": "Bytes of KV cache per rank; not set: measured from free GPU memory "
                       "(or a CPU default).",
    "num_kv_blocks": "Exact number of KV-cache blocks per rank (overrides "
                     "--kv-cache-memory).",
    "block_size": "Tokens per KV-cache block.",
    "max_num_seqs": "Most sequences decoded together in one batch.",
    "max_num_batched_tokens": "Most tokens computed in one engine step (the chunked-prefill "
                              "budget).",
    "load_format": "auto: load the safetensors weights of --model; random: random weights "
                   "(benchmarks).",
    "device": "Where the ranks run: auto (GPUs when present), cpu or cuda.",
    "seed": "Seed of random weights and of requests that set no seed.",
    "dist_timeout_s": "Seconds a collective between ranks may wait before the replica is "
                      "declared broken.",
    "gpu_memory_utilization": "Share of the GPU memory free after loading that the KV cache "
                              "and activations may take.",
    "cuda_graphs": "Replay decode steps from CUDA graphs (GPU only).",
    "piece_graph_tokens": "Steps that admit prompts, of up to this many tokens: replay each "
                          "layer's work but attention from CUDA graphs, in pieces (0: "
                          "eager; not set: 512 at tp=1 on a GPU, else 0).",
    "gemv_kernels": "Use Triton GEMV kernels for batch-1 matmuls where they beat cuBLAS "
                    "(16-bit, GPU only).",
    "async_scheduling": "Launch the next step before the host has read this step's "
                        "tokens (at tp > 1 on GPUs only, where rank 0 broadcasts them).",
    "overlap_chunk_tokens": "At tp > 1, split long prefills into chunks of this many tokens "
                            "so all-reduces overlap matmuls (0: off).",
    "shm_all_reduce": "At tp > 1 on CPU, all-reduce through shared memory instead of gloo.",
    "shm_step_messages": "At tp > 1, send each step's plan to the other ranks of the host "
                         "through shared memory instead of gloo.",
    "one_shot_all_reduce": "At tp > 1 on GPUs, all-reduce decode-size payloads in one "
                           "symmetric-memory kernel instead of NCCL.",
    "stream_interval": "Tokens per streamed delta after a request's first (with --data-path "
                       "serve each delta is a Serve message to the router): 1 sends every "
                       "token as it comes.",
    "fold_all_reduce": "At tp > 1 on GPUs, fold batch-1 decode's all-reduces into the "
                       "matrix-vector kernels beside them (experimental).",
    "quantization": "none; fp8: the linear layers' weights in FP8 (e4m3, a scale per "
                    "output channel), quantized at load; fp8-w8a8: activations in FP8 too "
                    "(FP8 tensor cores, less accurate). The embedding stays 16-bit; the LM "
                    "head too, but in decode of up to 64 sequences (see "
                    "--fp8-lm-head).",
    "w8a8_weight_only": "With --quantization fp8-w8a8: projections (comma-separated: "
                        "qkv_proj, o_proj, gate_up_proj, down_proj) computed weight-only, "
                        "their inputs left 16-bit; qkv_proj's input costs W8A8 the most "
                        "accuracy.",
    "w8a8_group": "With --quantization fp8-w8a8: 0, inputs scaled per token; 32, 64 or "
                  "128, per token and run of that many input columns (closer to the "
                  "16-bit model).",
    "keep_16bit": "With --quantization fp8 or fp8-w8a8: projections (comma-separated: "
                  "qkv_proj, o_proj, gate_up_proj, down_proj) left 16-bit, weights and "
                  "inputs; qkv_proj,o_proj,down_proj puts only gate_up_proj on FP8.",
    "fp8_lm_head": "In decode steps of up to 64 sequences the LM head reads FP8 rows "
                   "and computes each row's this many highest logits again from its "
                   "16-bit rows (kept beside: the head's memory 1.5x); 0: a 16-bit head; "
                   "not set: 16 with --quantization fp8 or fp8-w8a8, else 0.",
    "kv_cache_dtype": "auto (the model's dtype); fp8: the KV cache in FP8 (e4m3), twice "
                      "the tokens in the same memory; int8: in int8 with a scale per token "
                      "and head, 1.94x the tokens at head_dim 128 and closer to the 16-bit "
                      "model than fp8.",
    # StackConfig (infra/stack.py)
    "nginx_port": "Port of nginx, the cluster's front door (API and dashboard).",
    "serve_port": "Port of Ray Serve's HTTP proxy.",
    "dashboard_port": "Port of the Ray dashboard (and of Serve's REST API).",
    "ray_port": "Port of the Ray head (GCS).",
    "redis_port": "Port of Redis, which keeps the sessions.",
    "replicas": "Number of engine replicas to start (`tpserve scale` changes it later).",
    "router_replicas": "Number of router replicas (the OpenAI API); nginx spreads sessions "
                       "over them. Each streams on one core: more for many streams. Not set: "
                       "one per 4 cores of this machine, 1 to 4.",
    "data_path": "How the engine's tokens come back to the router: direct (one connection "
                 "per router and engine replica, one frame per engine step) or serve (each "
                 "delta a Serve message).",
    "num_cpus": "Logical CPUs Ray may hand out (each rank of a CPU replica takes one, each "
                "router replica one). Not set: 7 + the router replicas.",
    "gpus_per_rank": "Share of a GPU each rank takes; under 1, tp=1 replicas share GPUs "
                     "(then set --kv-cache-memory).",
    "state_dir": "Directory for the running cluster's state, logs and admin token.",
    "timeout_s": "Seconds to wait for the replicas to be running before giving up.",
    "routing": "pinned: each session stays on one replica (its prefix cache pays); random: "
               "any replica (a baseline).",
    "sessions": "on_use: store a session (pin and chat history) only when a request uses "
                "one (X-Session-ID or a \"session\" body field); always: for every request.",
    "rate_limit_per_minute": "Requests per minute allowed to one client (its session id, "
                             "user or IP) at each router replica; 0: no limit.",
}


def shown(value: object) -> str:
    """A default as `--help` shows it: the home directory as ~, not this machine's path;
    on/off for a switch; "not set" for None."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = "not set" if value is None else str(value)
    home = str(Path.home())
    if text == home or text.startswith(home + "/"):
        text = "~" + text[len(home):]
    return text


def add_config_arguments(parser: argparse.ArgumentParser, cls: type,
                         defaults: Mapping[str, typing.Any] | None = None,
                         sentences: Mapping[str, str] | None = None) -> None:
    """One `--flag` per field of the dataclass `cls`, typed and defaulted from it (or from
    `defaults`, for a command whose default differs, like the stack's tp=2); a bool field
    is `--flag/--no-flag`. `sentences` gives each field's help; the default is appended."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `int | None` -> int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = (defaults or {}).get(f.name, f.default)
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                         default=default)
        else:
            action = parser.add_argument(flag, type=kind, default=default)
        sentence = (sentences or {}).get(f.name, "")
        text = f"{sentence} (default: {shown(default)})".strip()
        action.help = text.replace("%", "%%")  # also replaces what BooleanOptionalAction adds


def config_from_args(args: argparse.Namespace, cls: type) -> typing.Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def generate(config: typing.Any, prompt: str, max_tokens: int) -> int:
    from replicas import Engine, SamplingParams

    print(f"starting the engine: model={config.model or 'built-in tiny'} tp={config.tp}")
    started = time.perf_counter()
    with Engine(config) as engine:
        print(f"ready in {time.perf_counter() - started:.1f} s; {engine.stats()['num_kv_blocks']}"
              " KV blocks")
        out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]
    print(f"prompt: {prompt!r}\ncompletion: {out.text!r} ({len(out.token_ids)} tokens, "
          f"finish_reason={out.finish_reason})")
    return 0


# ---- each command's flags, built only for the command being run ----------------------


def engine_fields() -> type:
    """EngineConfig's fields, read from the source of replicas/config.py into a stand-in
    dataclass: importing the engine imports torch (seconds), too slow for `tpserve up
    --help`. The real class still builds the config (config_from_args), and
    tests/test_cli.py checks that the two agree field for field. Where the source cannot
    be read that way (a default that is not a literal), it is the real class."""
    spec = importlib.util.find_spec("replicas")  # finds the package without running it
    try:
        assert spec is not None and spec.submodule_search_locations
        source = Path(spec.submodule_search_locations[0], "config.py").read_text()
        node = next(n for n in ast.parse(source).body
                    if isinstance(n, ast.ClassDef) and n.name == "EngineConfig")
        specs = [(a.target.id, _annotation(a.annotation),
                  dataclasses.field(default=ast.literal_eval(a.value)))
                 for a in node.body if isinstance(a, ast.AnnAssign)
                 and isinstance(a.target, ast.Name) and a.value is not None]
    except (AssertionError, OSError, StopIteration, SyntaxError, ValueError, KeyError):
        from replicas import EngineConfig

        return EngineConfig
    return dataclasses.make_dataclass("EngineConfig", specs, frozen=True)


def _annotation(node: ast.expr) -> typing.Any:
    """`int`, `str | None`...: the builtin types a config field may have (KeyError else)."""
    names = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}
    parts = [names[p.strip()] for p in ast.unparse(node).split("|")]
    return functools.reduce(operator.or_, parts)


def _up_arguments(parser: argparse.ArgumentParser) -> None:
    from infra.stack import StackConfig

    engine = parser.add_argument_group("engine (each replica)")
    add_config_arguments(engine, engine_fields(), {"tp": 2}, FIELD_HELP)  # TP=2 on CPU
    cluster = parser.add_argument_group("cluster")
    add_config_arguments(cluster, StackConfig, sentences=FIELD_HELP)
    parser.add_argument("--detach", action="store_true", help="Return once the cluster is "
                        "up and leave it running; `tpserve down` stops it.")


def _state_dir_argument(parser: argparse.ArgumentParser) -> None:
    from infra.stack import StackConfig

    parser.add_argument("--state-dir", default=StackConfig.state_dir,
                        help=f"{FIELD_HELP['state_dir']} (default: "
                        f"{shown(StackConfig.state_dir)})")


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, engine_fields(), sentences=FIELD_HELP)
    parser.add_argument("--prompt", default="The capital of France is",
                        help="The text to complete (default: %(default)s).")
    parser.add_argument("--max-tokens", type=int, default=24,
                        help="Most tokens to generate (default: %(default)s).")


def _scale_arguments(parser: argparse.ArgumentParser) -> None:
    from cluster.control import DEFAULT_DASHBOARD

    parser.add_argument("replicas", type=int, help="The number of engine replicas to run.")
    parser.add_argument("--dashboard", default=DEFAULT_DASHBOARD,
                        help="URL of the Ray dashboard, where Serve's REST API answers "
                        "(default: %(default)s).")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="Seconds to wait until exactly that many replicas run "
                        "(default: %(default)s).")


def _nginx_arguments(parser: argparse.ArgumentParser) -> None:
    from infra import nginx

    nginx.add_arguments(parser)


ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "up": _up_arguments, "down": _state_dir_argument, "status": _state_dir_argument,
    "scale": _scale_arguments, "generate": _generate_arguments, "nginx": _nginx_arguments,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command`, only that command gets its flags (the
    others' would import what it does not need: torch, Ray)."""
    parser = argparse.ArgumentParser(prog="tpserve", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if command is None or command == name:
            ARGUMENTS[name](p)
    return parser


def command_of(argv: list[str]) -> str:
    """The subcommand named in `argv` ("" when none: `tpserve --help`)."""
    return next((a for a in argv if not a.startswith("-")), "")


def scale_command(target: int, dashboard: str, timeout_s: float) -> int:
    from cluster.control import ServeError, scale

    try:
        running = scale(target, dashboard, timeout_s=timeout_s, progress=print)
    except ServeError as e:
        print(f"tpserve scale: {e}", file=sys.stderr)
        return 1
    print(f"{len(running)} engine replicas RUNNING: {', '.join(r.replica_id for r in running)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command_of(argv)).parse_args(argv)
    if args.command in ("up", "down", "status"):
        return stack_command(args)
    if args.command == "generate":
        from replicas import EngineConfig

        return generate(config_from_args(args, EngineConfig), args.prompt, args.max_tokens)
    if args.command == "nginx":
        from infra import nginx

        return nginx.run(args)
    if args.command == "scale":
        return scale_command(args.replicas, args.dashboard, args.timeout_s)
    return 2


def stack_command(args: argparse.Namespace) -> int:
    from infra import stack

    try:
        if args.command == "up":
            from replicas import EngineConfig

            engine = config_from_args(args, EngineConfig).to_dict()
            return stack.up(engine, config_from_args(args, stack.StackConfig), args.detach)
        if args.command == "down":
            return stack.down(args.state_dir)
        return stack.status(args.state_dir)
    except stack.StackError as e:
        print(f"tpserve {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while it started: all of it stopped
        print(f"\ntpserve {args.command}: interrupted; what it started is stopped",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
