"""Shared fixtures: a tiny offline tokenizer with a chat template, tiny random Llama models, JSONL writer.

Nothing here touches the network. The tokenizer is a byte-level BPE trained on a few
sentences (so it can encode any text, like SmolLM2's), wrapped in a fast tokenizer with
`<s>`/`</s>`/`<pad>`/`<unk>` and the ChatML markers `<|im_start|>`/`<|im_end|>`. It adds
`<s>` in front of plain encodings (Llama style) but not inside chat renderings.

Fixture names are part of the test suite's interface (other test modules use them):
`tiny_model_dir`, `tiny_student_dir`, `tiny_tokenizer`, `make_jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "Knowledge distillation trains a small student model to imitate a large teacher model.",
    "system user assistant",
    "What is the capital of France? Paris is the capital of France.",
    "One two three four five six seven eight nine ten. 1 2 3 4 5 6 7 8 9 10",
]

TOKENIZER_VOCAB = 400  # BPE vocabulary size requested from the trainer (specials included)
MODEL_VOCAB = 448  # embedding rows: padded past the tokenizer, as real checkpoints often are


def build_tiny_tokenizer():
    """A deterministic byte-level BPE fast tokenizer with a ChatML chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 5, trainer)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
    )
    assert len(tokenizer) <= MODEL_VOCAB
    return tokenizer


def _save_tiny_llama(folder: Path, *, num_layers: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=MODEL_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama (hidden 32, GQA 4/2 heads, tied embeddings, 448 rows) and its tokenizer."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), num_layers=4, seed=1234)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as tiny_model_dir, 2 layers, another seed."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny_student"), num_layers=2, seed=4321)


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """The tokenizer saved in tiny_model_dir, loaded fresh for each test (tests may modify it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def make_jsonl(tmp_path) -> Callable[..., Path]:
    """`make_jsonl(rows, name="data.jsonl")`: dicts/lists are written as JSON, strings verbatim (one a line)."""

    def make(rows: Iterable[Any], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return make


@pytest.fixture
def one_thread():
    """Tiny models on shared cores: one intra-op thread is much faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
