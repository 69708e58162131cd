"""Shared fixtures: tiny random models with tiny tokenizers, built offline once per session, and recipe helpers.

Nothing here touches the network or the lite-ft cache: the models are random LlamaConfig / BertConfig instances
saved with save_pretrained, and the tokenizers are trained in a fraction of a second on lite-ft's built-in data.
"""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from helpers import ASSETS, read_jsonl, recipe_doc

# One intra-op thread: the tiny models are latency-bound, and on a shared 2-core machine oversubscribed OpenMP
# threads make small matmuls up to ~40x slower. One thread also keeps CPU results reproducible run to run.
torch.set_num_threads(int(os.environ.get("LITE_FT_TEST_THREADS", "1")))

# Tiny chat template: role line, content, end of turn. Exercises tokenizer.apply_chat_template in the qa and
# instruction tasks exactly as a real chat model's template does.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _asset_texts() -> list[str]:
    from lite_ft.data.tasks.qa import INSTRUCTION

    texts = [INSTRUCTION]
    for path in sorted(ASSETS.glob("*.jsonl")):
        for row in read_jsonl(path):
            texts += [row[k] for k in ("context", "question", "sentence") if isinstance(row.get(k), str)]
    return texts


def build_llama_tokenizer(texts: list[str]) -> Any:
    """A 1,000-token BPE (Metaspace, so decoding restores spaces) with <pad> <s> </s> <unk> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=list(string.printable), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def build_bert_tokenizer(texts: list[str]) -> Any:
    """A 600-token lower-cased WordPiece with BERT's special tokens and [CLS] ... [SEP] framing."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials,
                                                             show_progress=False))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64, 4 heads, 2 KV heads) and its tokenizer, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_llama_tokenizer(_asset_texts())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(1234)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT encoder (hidden 32) without a head, like MiniLM, and a WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    sentences = [r["sentence"] for name in ("sentiment_train", "sentiment_eval")
                 for r in read_jsonl(ASSETS / f"{name}.jsonl")]
    tokenizer = build_bert_tokenizer(sentences)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1234)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def qa_rows() -> list[dict[str, Any]]:
    """The built-in QA training rows (SQuAD schema: id, context, question, answers.text/answer_start)."""
    return read_jsonl(ASSETS / "qa_train.jsonl")


@pytest.fixture
def make_doc(tmp_path: Path, tiny_llama_dir: Path, tiny_bert_dir: Path) -> Callable[..., dict[str, Any]]:
    """make_doc(task, method, **sections) -> a small recipe document on the tiny models, output in tmp_path/run."""
    def make(task: str = "qa", method: str = "lora", **sections: Any) -> dict[str, Any]:
        return recipe_doc(task, method, tmp_path, tiny_llama_dir, tiny_bert_dir, **sections)

    return make


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """write_recipe(doc, name) -> path of the document written as YAML into tmp_path."""
    def write(doc: dict[str, Any], name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        return path

    return write
