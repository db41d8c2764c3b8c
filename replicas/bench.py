"""Engine benchmarks: `python -m replicas.bench [--suite cpu] [--out FILE]`.

Each case prints one JSON line (and appends it to --out): our figure, transformers'
figure measured in the same run on the same shapes and tokens, their ratio, and the
hardware, versions and command. The CPU suite runs on the built-in tiny model; absolute
times there only say that the path works, the ratios say more. The GPU suite comes with
the GPU-speed issue.

Decode time per token is (time of N new tokens - time of 1 new token) / (N - 1), so
prefill and start-up cancel out, for both engines alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

from replicas import Engine, EngineConfig, SamplingParams
from replicas.tiny import tiny_model_dir


def environment() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "hardware": {"cpu": platform.processor() or platform.machine(),
                     "cores": os.cpu_count(), "gpu": gpu},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "command": " ".join(["python -m replicas.bench", *sys.argv[1:]]),
    }


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of `repeats` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


def ours_per_token(engine: Engine, prompts: list[list[int]], new: int, repeats: int) -> float:
    def run(n: int) -> Callable[[], object]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return lambda: engine.generate(prompts, params)

    return (best_of(run(new), repeats) - best_of(run(1), repeats)) / (new - 1)


def hf_per_token(model: Any, prompts: list[list[int]], new: int, repeats: int) -> float:
    ids = torch.tensor(prompts)  # equal lengths: no padding needed

    def run(n: int) -> Callable[[], object]:
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)

    return (best_of(run(new), repeats) - best_of(run(1), repeats)) / (new - 1)


def cpu_suite(repeats: int) -> list[dict[str, Any]]:
    model_dir = tiny_model_dir()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for tp in (1, 2):
        with Engine(EngineConfig(model=model_dir, tp=tp)) as engine:
            vocab = engine.spec.vocab_size
            for batch, prompt_len, new in ((1, 128, 64), (16, 128, 32)):
                prompts = prompts_for(batch, prompt_len, vocab)
                ours = ours_per_token(engine, prompts, new, repeats)
                theirs = hf_per_token(hf, prompts, new, repeats) if tp == 1 else None
                rows.append(_row(f"decode_b{batch}_in{prompt_len}_tp{tp}", "ms/token", ours,
                                 theirs, batch=batch, prompt_len=prompt_len, new_tokens=new,
                                 tp=tp))
            prompts = prompts_for(64, 32, vocab)
            params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
            wall = best_of(lambda e=engine, p=params, q=prompts: e.generate(q, p), repeats)
            rows.append({"case": f"throughput_64req_in32_out32_tp{tp}", "unit": "tokens/s",
                         "ours": round(64 * 32 / wall, 1), "tp": tp})
    return rows


def _row(case: str, unit: str, ours: float, theirs: float | None, **shape: Any
         ) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case, "unit": unit, "ours": round(ours * 1e3, 3), **shape}
    if theirs is not None:
        row["transformers"] = round(theirs * 1e3, 3)
        row["ratio_ours_over_transformers"] = round(ours / theirs, 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["cpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="append the JSON lines to this file too")
    args = parser.parse_args()
    env = environment()
    for row in cpu_suite(args.repeats):
        line = json.dumps({**row, "suite": args.suite, **env})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
