"""The built-in tiny model: made once, reused, and a valid HF checkpoint + tokenizer."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from replicas import tiny
from replicas.tiny import TINY_VERSION, tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("cache")))


def test_made_once_and_reused(tiny_dir: str) -> None:
    root = str(Path(tiny_dir).parent)
    weights = Path(tiny_dir) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert tiny_model_dir(root) == tiny_dir
    assert weights.stat().st_mtime_ns == mtime  # not rebuilt
    assert Path(tiny_dir).name == TINY_VERSION
    assert os.listdir(root) == [TINY_VERSION]  # no temporary folder left behind


def test_env_var_picks_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPSERVE_CACHE", str(tmp_path))
    assert tiny_model_dir() == str(tmp_path / TINY_VERSION)


def _build(root: str) -> str:
    return tiny_model_dir(root)


def test_racing_processes_get_one_complete_dir(tmp_path: Path) -> None:
    with mp.get_context("spawn").Pool(2) as pool:
        dirs = pool.map(_build, [str(tmp_path)] * 2)
    assert dirs == [str(tmp_path / TINY_VERSION)] * 2
    assert os.listdir(tmp_path) == [TINY_VERSION]
    assert AutoModelForCausalLM.from_pretrained(dirs[0]) is not None


def test_losing_the_rename_uses_the_winners_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = tiny._build_tiny

    def build_while_another_process_wins(path: Path) -> None:
        build(path)
        monkeypatch.setattr(tiny, "_build_tiny", build)
        tiny_model_dir(str(tmp_path))  # the other process renames first

    monkeypatch.setattr(tiny, "_build_tiny", build_while_another_process_wins)
    assert tiny_model_dir(str(tmp_path)) == str(tmp_path / TINY_VERSION)
    assert os.listdir(tmp_path) == [TINY_VERSION]


def test_loads_with_transformers(tiny_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("Hello, how are you?", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 4


def test_tokenizer_round_trips_text(tiny_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for text in ["The quick brown fox.", "naïve café, 日本語 and emoji 🙂", "  spaces\n\ttabs "]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # real merges were learnt: common words are one or two tokens, not bytes
    assert len(tokenizer.encode("the quick brown fox", add_special_tokens=False)) <= 8


def test_special_tokens_match_config(tiny_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = json.loads((Path(tiny_dir) / "config.json").read_text())
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    assert config["bos_token_id"] == tokenizer.bos_token_id
    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert config["pad_token_id"] == tokenizer.pad_token_id


def test_chat_template_renders(tiny_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHello!</s>\n<|assistant|>\n"
    closed = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not closed.endswith("<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in ids


def test_a_process_without_torch_builds_it_in_a_child_and_stays_without(
        tmp_path: Path, tiny_dir: str) -> None:
    """An engine replica's Serve process (no torch: its engine runs in a process of its
    own) that is first to need the tiny model builds it in a child Python: the same files
    as a build in a process with torch, and torch still not imported."""
    from probes import run_probe

    out, loaded = run_probe("import sys\nfrom replicas.tiny import tiny_model_dir\n"
                            "print(tiny_model_dir(sys.argv[1]))", str(tmp_path), timeout=600)
    built = out.stdout.splitlines()[-2]
    assert built == str(tmp_path / TINY_VERSION) and "torch" not in loaded, (built, loaded)
    assert sorted(os.listdir(built)) == sorted(os.listdir(tiny_dir))
    for name in ("config.json", "tokenizer.json"):
        assert (Path(built) / name).read_text() == (Path(tiny_dir) / name).read_text()
    assert (Path(built) / "model.safetensors").read_bytes() == \
        (Path(tiny_dir) / "model.safetensors").read_bytes()  # (seeded: the same weights)
