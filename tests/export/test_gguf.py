"""GGUF export on tiny byte-level models, without llama.cpp: the pre-tokenizer name comes from how the tokenizer
splits text, a source GGUF's tokenizer keys are carried, tensors are named and typed as llama.cpp expects and
stream from disk, the file reads back with transformers, the Ollama template renders what the chat template
renders, and without the gguf-check extra the export says it was not checked in llama.cpp.

The builders here are shared with test_gguf_llama_cpp.py, which checks the same files in the real llama.cpp.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from click.testing import CliRunner

from conftest import _asset_texts
from helpers import recipe_doc, save_tiny_llama
from lite_ft import cli
from lite_ft.errors import LiteFTError
from lite_ft.export import gguf_export, gguf_vocab, llama_cpp, ollama
from lite_ft.export.gguf import permute
from lite_ft.export.gguf_check import PROBES
from lite_ft.export.merge import merge
from lite_ft.recipe.load import load_recipe
from lite_ft.run import run

# ChatML with a default system turn, like SmolLM2's template.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bytelevel_tokenizer(pre: Any = None, vocab_size: int = 1000, unsplit: bool = False) -> Any:
    """A byte-level BPE trained on lite-ft's texts and the probe texts, with a ChatML template. `unsplit` trains
    on whole lines, so that merges span digits, spaces and punctuation and any other split gives other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pre = pre or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False) if unsplit else pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_asset_texts() + [gguf_vocab.PROBE, *PROBES.values()] * (20 if unsplit else 3), trainer)
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHATML)


def tiny_llama(folder: Path, tokenizer: Any, hidden: int = 256, tied: bool = True) -> Path:
    """A random 2-layer Llama; hidden 256 so that llama.cpp's k-quants (blocks of 256) apply to every matrix."""
    return save_tiny_llama(folder, tokenizer, hidden, tied=tied)


def train_run(folder: Path, model_dir: Path, method: str = "lora", **sections: Any) -> Path:
    """A 3-step QA run on the tiny model (LoRA at lr 1e-2: the adapter clearly changes it); the run folder."""
    doc = recipe_doc("qa", method, folder, model_dir, model_dir, **{"train": {"lr": 1e-2}, **sections})
    run(load_recipe(document=doc))
    return folder / "run"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf-tiny")
    return train_run(root, tiny_llama(root / "model", bytelevel_tokenizer()))


@pytest.fixture(scope="module")
def untied_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf-untied")
    return train_run(root, tiny_llama(root / "model", bytelevel_tokenizer(), tied=False))


def no_leftovers(out: Path) -> bool:
    siblings = out.parent.iterdir() if out.parent.is_dir() else []
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in siblings)


@pytest.mark.parametrize("name", list(gguf_vocab.LLAMA_CPP_SPLITS))
def test_the_pre_tokenizer_name_comes_from_the_split(name: str) -> None:
    tokenizer = bytelevel_tokenizer(gguf_vocab.LLAMA_CPP_SPLITS[name], vocab_size=400)
    assert gguf_vocab.split_name(tokenizer) == name
    assert gguf_vocab.pre_tokenizer(tokenizer, None)["name"] == name


def test_the_probe_tells_every_known_split_apart() -> None:
    splits = {name: str(pre.pre_tokenize_str(gguf_vocab.PROBE)) for name, pre in gguf_vocab.LLAMA_CPP_SPLITS.items()}
    assert len(set(splits.values())) == len(splits)
    assert set(gguf_vocab.LLAMA_CPP_SPLITS) <= gguf_vocab.LLAMA_CPP_NAMES and "gpt2" not in gguf_vocab.LLAMA_CPP_NAMES


def test_a_split_llama_cpp_does_not_know_is_refused() -> None:
    from tokenizers import Regex, pre_tokenizers

    odd = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+|\s+|[^\w\s]+"), "isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(LiteFTError, match="splits text like none of the pre-tokenizers llama.cpp knows"):
        gguf_vocab.pre_tokenizer(bytelevel_tokenizer(odd, vocab_size=400), None)
    prefixed = bytelevel_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True), vocab_size=400)
    assert gguf_vocab.split_name(prefixed) is None  # " Hello" vs "Hello": llama.cpp never adds the space


def test_permutation_is_what_transformers_reverses() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(3 * 2 * 8, 5).numpy()  # 3 KV heads of head_dim 16 (8 rotary pairs)
    undone = LlamaTensorProcessor({"num_attention_heads": 6, "num_key_value_heads": 3})._reverse_permute_weights(
        permute(w, 6, 3), 6, 3)
    assert (undone == w).all() and not (permute(w, 6, 3) == w).all()


def _source_gguf(path: Path, tokens: list[str], pre: str) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_eot_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def test_a_source_ggufs_tokenizer_keys_are_carried(tmp_path: Path) -> None:
    tokenizer = bytelevel_tokenizer(gguf_vocab.LLAMA_CPP_SPLITS["gpt-2"], vocab_size=400)
    tokens = gguf_vocab.token_list(tokenizer, len(tokenizer))[0]
    source = _source_gguf(tmp_path / "source.gguf", tokens, "phi-2")  # a name llama.cpp knows, outside the table
    pre = gguf_vocab.pre_tokenizer(tokenizer, source)
    assert pre["name"] == "phi-2" and pre["from"] == "source GGUF source.gguf" and pre["split_matches"] == "gpt-2"
    writer = gguf.GGUFWriter(str(tmp_path / "out.gguf"), "llama")
    written = gguf_vocab.add_tokenizer(writer, tokenizer, len(tokenizer), pre)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_ti_data_to_file):
        step()
    writer.close()
    fields = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "phi-2" and fields["tokenizer.ggml.eot_token_id"].contents() == 2
    assert written["carried_from_source"] == ["tokenizer.ggml.pre", "tokenizer.ggml.token_type",
                                              "tokenizer.ggml.eot_token_id"]
    # A source whose name contradicts how this tokenizer splits (a conversion that dropped SmolLM's digit split):
    # the run's own split wins. A source with another vocabulary says nothing about this one.
    contradicting = gguf_vocab.pre_tokenizer(tokenizer, _source_gguf(tmp_path / "s.gguf", tokens, "smollm"))
    assert contradicting["name"] == "gpt-2" and "the source GGUF says 'smollm'" in contradicting["from"]
    other = gguf_vocab.pre_tokenizer(tokenizer, _source_gguf(tmp_path / "o.gguf", tokens[::-1], "phi-2"))
    assert other["name"] == "gpt-2" and other["carried"] is None


@pytest.mark.parametrize("gguf_type,tied", [("q8_0", True), ("f16", False)])
def test_gguf_layout_and_transformers_read_back(tiny_run: Path, untied_run: Path, tmp_path: Path, gguf_type: str,
                                                tied: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(llama_cpp, "version", lambda: None)  # as where the gguf-check extra is not installed
    run_dir = tiny_run if tied else untied_run
    record = merge(run_dir, tmp_path / "out", fmt="gguf", gguf_type=gguf_type)
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert ("output.weight" in kinds) is (not tied) and len(kinds) == 2 * 9 + 2 + (not tied)  # 9 a layer
    assert kinds["blk.1.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == gguf_type.upper()
    assert kinds["blk.1.ffn_down.weight"] == gguf_type.upper() and kinds["token_embd.weight"] == gguf_type.upper()
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert record["merge_strategy"].startswith("streaming LoRA merge into GGUF")
    assert record["gguf"]["checked_in"].startswith("transformers only; not checked in llama.cpp")
    trip = record["gguf"]["roundtrip"]
    assert trip["max_abs_diff"] <= trip["bound"] and trip["greedy_agreement"] > 0.9
    read = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    assert read(PROBES["contractions"])["input_ids"] == tokenizer(PROBES["contractions"])["input_ids"]
    assert read.chat_template == tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="model.gguf")
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    card = (tmp_path / "out" / "README.md").read_text()
    assert "not checked in llama.cpp" in card.lower() and f"{trip['max_abs_diff']:.3g}" in card


def test_streamed_and_in_memory_merges_write_the_same_tensors(tiny_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp, "version", lambda: None)
    streamed = merge(tiny_run, tmp_path / "streamed", fmt="gguf", gguf_type="f32")
    in_memory = merge(tiny_run, tmp_path / "in-memory", fmt="gguf", gguf_type="f32", strategy="in-memory")
    assert streamed["merge_strategy"].startswith("streaming LoRA merge into GGUF")
    assert "not streamed: the in-memory merge was requested" in in_memory["merge_strategy"]
    # (which one peaks lower is test_streaming's peak-memory test, in a fresh process on a 256 MiB model: here the
    # worker's RSS is the whole suite's so far, and a tiny model's merge moves it by under 2 MiB either way)
    tensors = [{t.name: t.data.copy() for t in gguf.GGUFReader(str(tmp_path / name / "model.gguf")).tensors}
               for name in ("streamed", "in-memory")]
    assert tensors[0].keys() == tensors[1].keys()
    assert all((tensors[0][k] == tensors[1][k]).all() for k in tensors[0])  # W + s * B @ A, bit for bit
    full = merge(train_run(tmp_path / "full", Path(load_recipe(tiny_run / "recipe.yaml").model.source),
                           method="full", train={"lr": 1e-3, "max_steps": 1}), tmp_path / "f", fmt="gguf")
    assert "a full run's weights are converted in memory" in full["merge_strategy"]
    assert full["gguf"]["roundtrip"]["max_abs_diff"] <= full["gguf"]["roundtrip"]["bound"]


def test_without_llama_cpp_k_quants_are_refused_and_the_cli_says_unchecked(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp, "version", lambda: None)
    with pytest.raises(LiteFTError, match="made by llama.cpp's quantizer, which is not installed"):
        merge(tiny_run, tmp_path / "q4", fmt="gguf", gguf_type="q4_k_m")
    assert no_leftovers(tmp_path / "q4")
    result = CliRunner().invoke(cli.main, ["merge", str(tiny_run), "--out", str(tmp_path / "f32"), "--format",
                                           "gguf", "--gguf-type", "f32"])
    assert result.exit_code == 0, result.output
    assert "not checked in llama.cpp (the gguf-check extra is not installed" in result.output
    assert cli.GGUF_TYPES == list(gguf_export.GGUF_TYPES)


def go_render(template: str, values: dict[str, str], cut: bool) -> str:
    """Go text/template for the actions these templates use ({{ .X }}, {{ if .X }}, {{ else }}, {{ end }}; an
    empty string is false); with `cut`, what follows {{ .Response }} is dropped, as Ollama does when it prompts
    for a reply."""
    out, stack = [], []  # stack: (parent renders, condition, in else)
    for part in re.split(r"(\{\{.*?\}\})", template):
        action = re.fullmatch(r"\{\{ (.*?) \}\}", part)
        active = all(parent and (cond != in_else) for parent, cond, in_else in stack)
        if action is None:
            out.append(part if active else "")
            continue
        words = action[1].split()
        assert words[0] in ("if", "else", "end") or re.fullmatch(r"\.\w+", words[0]), f"unknown action {part}"
        if words[0] == "if":
            stack.append((active, bool(values[words[1][1:]]), False))
        elif words[0] == "else":
            stack[-1] = (stack[-1][0], stack[-1][1], True)
        elif words[0] == "end":
            stack.pop()
        elif active:
            out.append(values[words[0][1:]])
            if words[0] == ".Response" and cut:
                assert not stack, "Ollama would cut inside a branch"
                break
    return "".join(out)


def ollama_prompt(text: str, default: str | None, turns: list[tuple[str, str]], system: str | None) -> str:
    """What Ollama renders for a conversation with a legacy template: one execution per (prompt, reply) turn,
    the system text (the request's, else the Modelfile's SYSTEM) in the first only, the last turn cut at its
    reply when that reply is still to come."""
    system = system if system is not None else default or ""
    rendered = []
    for i, (prompt, reply) in enumerate(turns):
        last = i == len(turns) - 1
        rendered.append(go_render(text, {"System": system, "Prompt": prompt, "Response": reply}, last and not reply))
        system = ""
    return "".join(rendered)


LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
          "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
ROLE_LINES = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
              "{% if add_generation_prompt %}<s>assistant\n{% endif %}")  # the conftest model's template


@pytest.mark.parametrize("chat_template", [CHATML, LLAMA3, ROLE_LINES], ids=["chatml", "llama3", "role-lines"])
def test_the_ollama_template_renders_what_the_chat_template_renders(chat_template: str) -> None:
    tokenizer = bytelevel_tokenizer(vocab_size=300)
    tokenizer.chat_template = chat_template
    text, info = ollama.modelfile(tokenizer, "model.gguf")
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S)[1]
    default = info["default_system"]
    assert (f'SYSTEM """{default}"""' in text) is (default is not None) and info["template"].startswith("rendered")

    def jinja(*messages: tuple[str, str], generation: bool = False) -> str:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                             add_generation_prompt=generation)

    sys, user, reply, user2 = ("system", "Be brief."), ("user", "Don't panic: 2+2?"), ("assistant", "4."), \
        ("user", "And 3+3?")
    assert ollama_prompt(template, default, [(user[1], reply[1])], sys[1]) == jinja(sys, user, reply)
    assert ollama_prompt(template, default, [(user[1], "")], sys[1]) == jinja(sys, user, generation=True)
    assert ollama_prompt(template, default, [(user[1], reply[1])], None) == jinja(user, reply)
    assert ollama_prompt(template, default, [(user[1], reply[1]), (user2[1], "")], sys[1]) == \
        jinja(sys, user, reply, user2, generation=True)
    assert (default == "You are a helpful assistant.") is (chat_template == CHATML)
    assert info["stops"][0] == "<|im_end|>"


def test_a_template_without_fixed_turns_falls_back_to_the_prompt() -> None:
    tokenizer = bytelevel_tokenizer(vocab_size=300)
    tokenizer.chat_template = "{{ messages | length }} messages: {{ messages[-1]['content'] | upper }}"
    text, info = ollama.modelfile(tokenizer, "model.gguf")
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "does not render turns" in info["template"]
