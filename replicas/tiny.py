"""The built-in tiny model: a Llama-shaped checkpoint with random weights and a locally
trained tokenizer, in Hugging Face format, made on first use.

Contract:
- `tiny_model_dir()` returns a local directory holding `config.json`,
  `model.safetensors` (float32), the tokenizer files and a chat template; anything that
  loads a HF checkpoint (our engine, `transformers.AutoModelForCausalLM`,
  `AutoTokenizer`) can read it. Nothing is downloaded.
- The directory lives under `$TPSERVE_CACHE` (default `~/.cache/tpserve`) in a folder
  named after `TINY_VERSION`; it is built once and reused. Two processes that race to
  build it both end up with the same, complete directory: each builds in a private
  temporary folder beside it and `os.rename`s it into place; the loser drops its copy.
- Weights come from a fixed seed, so the same version gives the same model everywhere.
- `build_tokenizer(path)` writes the same tokenizer (and chat template) into any
  directory, so tests can pair it with checkpoints of other families.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TINY_VERSION = "tiny-llama-v2"  # v2: the chat template renders tools
SEED = 1234
VOCAB_SIZE = 1000  # target size of the trained BPE vocabulary (specials included)
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in this order

# Role-tagged turns; `add_generation_prompt` opens an assistant turn for the model.
# With tools, a system turn lists them and asks for Hermes-style calls (<tool_call>{"name",
# "arguments"}</tool_call>), as Qwen's templates do; an assistant's calls are rendered so.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nYou may call these functions:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    'To call one, reply <tool_call>{"name": ..., "arguments": {...}}</tool_call>'
    "{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}<tool_call>"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson }}</tool_call>{% endfor %}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Shapes of the tiny model; kv heads < heads so it exercises grouped-query attention and
# 2 kv heads split evenly over tp=2.
TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.2,  # wide logits: greedy argmax is well separated
    "tie_word_embeddings": False,
}

# A small English corpus so that the tokenizer learns real merges (words, not bytes).
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. To be, or not to be, that is the question. All that glitters is not gold.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the
age of foolishness, it was the epoch of belief, it was the epoch of incredulity.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money
in my purse, and nothing particular to interest me on shore, I thought I would sail about a
little and see the watery part of the world.
In the beginning the universe was created. This has made a lot of people very angry and
been widely regarded as a bad move.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Can you tell me the weather in Paris? It is sunny and warm, with a light breeze from the
west. Please write a short poem about the sea. The sea is wide, the sea is deep, it sings
the sailors into sleep.
A server receives a request, reads the prompt, and returns the generated text. The model
predicts the next token given the previous tokens. Each layer has attention and a feed
forward network. The cache keeps the keys and values of earlier tokens so that they are
not computed again. Tensor parallel inference splits each layer across several devices;
the partial results are summed with an all-reduce after the row parallel layers.
The user asked a question and the assistant answered it. The system message sets the
rules of the conversation. Users send messages, the assistant replies, and the router
keeps each user on the same replica so the prefix cache is reused.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096.
Once upon a time there was a little girl who lived in a village near the forest. Whenever
she went out, the little girl wore a red riding cloak, so everyone in the village called
her Little Red Riding Hood. One morning she asked her mother if she could go to visit her
grandmother, as it had been a while since they had seen each other.
The rain in Spain stays mainly in the plain. She sells sea shells by the sea shore. Peter
Piper picked a peck of pickled peppers. How much wood would a woodchuck chuck if a
woodchuck could chuck wood?
Science is organized knowledge. Wisdom is organized life. Knowledge is power. Time is
money. Practice makes perfect. Actions speak louder than words. Better late than never.
The early bird catches the worm. Do not count your chickens before they hatch. Where there
is a will, there is a way. When in Rome, do as the Romans do.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
{"role": "user", "content": "hello"} [1, 2, 3] (x, y) <tag>text</tag> a-b_c.d/e:f;g
"""


def cache_root() -> Path:
    """Where tpserve keeps generated artefacts: `$TPSERVE_CACHE` or `~/.cache/tpserve`."""
    root = os.environ.get("TPSERVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tpserve"


def tiny_model_dir(cache_dir: str | None = None) -> str:
    """Return the directory of the built-in tiny model, building it on first use.

    `cache_dir` overrides the cache root. Safe when several processes call it at once:
    the directory appears complete or not at all.
    """
    return cached_dir(TINY_VERSION, _build_tiny_keeping_torch_out, cache_dir)


def cached_dir(name: str, build: Callable[[Path], None], cache_dir: str | None = None
               ) -> str:
    """The directory `name` under the cache root (`cache_dir`, else `cache_root()`), made
    by `build(folder)` on first use. Safe when several processes call it at once: it is
    built in a temporary folder and renamed into place, so it appears complete or not at
    all."""
    root = Path(cache_dir) if cache_dir else cache_root()
    final = root / name
    if (final / "config.json").is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process won the race
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def build_tokenizer(path: str | os.PathLike[str]) -> int:
    """Train the tiny byte-level BPE tokenizer and save it (with the chat template) into
    `path` via `PreTrainedTokenizerFast.save_pretrained`. Returns the vocabulary size.

    Deterministic: the same corpus gives the same vocabulary. Special token ids:
    `<s>` 0, `</s>` 1, `<pad>` 2.
    """
    tokenizer = _train_tokenizer()
    tokenizer.save_pretrained(str(path))
    # transformers 5 writes its own class name ("TokenizersBackend"); the generic name
    # loads under both 4.x and 5.x.
    config_file = Path(path) / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tok_config, indent=2) + "\n")
    return len(tokenizer)


def special_token_ids() -> dict[str, int]:
    """The ids a model config must carry to match the tokenizer."""
    return {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def _train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes
        show_progress=False,
    )
    core.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = special_token_ids()
    assert tokenizer.bos_token_id == ids["bos_token_id"]
    assert tokenizer.eos_token_id == ids["eos_token_id"]
    assert tokenizer.pad_token_id == ids["pad_token_id"]
    return tokenizer


def _build_tiny_keeping_torch_out(path: Path) -> None:
    """_build_tiny in this process when it has imported torch already, else in a child
    Python: a process without torch (an engine replica's Serve process, whose engine runs
    in a process of its own) stays without it, ~5 s of CPU and ~400 MB resident."""
    if "torch" in sys.modules:
        _build_tiny(path)
        return
    done = subprocess.run(  # (in this package's root: `-c` imports from its folder)
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\n"
         "from replicas.tiny import _build_tiny\n_build_tiny(Path(sys.argv[1]))", str(path)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the tiny model in {path} failed (exit "
                           f"{done.returncode}):\n{done.stderr[-3000:]}")


def _build_tiny(path: Path) -> None:
    """Write the tokenizer, then a seeded random LlamaForCausalLM sized to its vocab."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = build_tokenizer(path)
    config = LlamaConfig(
        vocab_size=vocab,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **TINY_CONFIG,
        **special_token_ids(),
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(str(path), safe_serialization=True)
