"""What the engine replica's Serve process reads of a model directory without torch
(replicas/engineproc.py: its engine process reads the rest): the architecture and tp
check on config.json as JSON, which must refuse exactly what the whole config refuses,
and the tokenizer, which must be the one AutoTokenizer gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from checkpoints import FAMILIES, CheckpointFactory

from replicas.config import SUPPORTED_TP, ConfigError, ModelSpec, check_model_dir
from replicas.tiny import tiny_model_dir
from replicas.tokenizer import load_hf_tokenizer


def whole_config_refusal(model_dir: str, tp: int) -> str | None:
    from transformers import AutoConfig

    try:
        ModelSpec.from_hf(AutoConfig.from_pretrained(model_dir)).check_tp(tp)
    except ConfigError as e:
        return str(e)
    return None


def light_refusal(model_dir: str, tp: int) -> str | None:
    try:
        check_model_dir(model_dir, tp)
    except ConfigError as e:
        return str(e)
    return None


# each family as the other tests build it, and other head counts and MLP widths in one
@pytest.mark.parametrize(("family", "overrides"), [
    *((family, {}) for family in FAMILIES), ("llama", {"num_key_value_heads": 1}),
    ("qwen2", {"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 36})])
def test_config_json_refuses_the_tps_the_whole_config_refuses(
        checkpoint: CheckpointFactory, family: str, overrides: dict[str, int]) -> None:
    model = checkpoint(family, **overrides)
    for tp in SUPPORTED_TP:
        assert light_refusal(model, tp) == whole_config_refusal(model, tp), (family, tp)


def test_a_config_json_the_check_cannot_judge_is_left_to_the_engine(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    config = json.loads((model / "config.json").read_text())
    unknown = {**config, "architectures": ["GPT2LMHeadModel"]}
    (model / "config.json").write_text(json.dumps(unknown))
    assert "supported: LlamaForCausalLM" in (light_refusal(str(model), 1) or "")
    # the MLP's width left to the class's default: the engine's own check decides
    (model / "config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k != "intermediate_size"}))
    assert light_refusal(str(model), 8) is None
    (model / "config.json").write_text("{")
    assert "cannot read" in (light_refusal(str(model), 1) or "")


def test_the_tokenizer_is_the_one_autotokenizer_gives(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model's tokenizer_config.json names transformers' generic fast tokenizer:
    loaded by name (no torch), it encodes, decodes and renders chats as AutoTokenizer's
    does; a checkpoint naming another class gets AutoTokenizer's choice."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model = tiny_model_dir()
    ours, auto = load_hf_tokenizer(model), AutoTokenizer.from_pretrained(model)
    assert type(ours) is type(auto) is PreTrainedTokenizerFast
    text = "Hello there, how are you? 12 + 30 = 42 ünïcödé"
    assert ours.encode(text) == auto.encode(text)
    ids = auto.encode(text)
    assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids,
                                                                     skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert (ours.eos_token_id, ours.bos_token_id) == (auto.eos_token_id, auto.bos_token_id)
    other = tmp_path / "other"
    shutil.copytree(model, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaTokenizerFast"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    asked: list[str] = []
    auto_load = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda path, **kw: asked.append(path) or auto_load(path, **kw))
    assert type(load_hf_tokenizer(str(other))) is type(auto_load(str(other)))
    assert asked == [str(other)]  # (AutoTokenizer chose; here, with a warning)
