"""The streaming LoRA merge on tiny random models: it equals peft's merge_and_unload (plain, rsLoRA, rank/alpha
patterns, fan_in_fan_out), shards load with plain transformers, tied embeddings stay tied, adapters it does not
handle are refused with a reason, and it reads each tensor once and holds about one tensor at a time."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lite_ft.export import streaming as sm
from lite_ft.errors import LiteFTError

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 80, 7]])


def _llama(folder: Path, tied: bool = False, layers: int = 2, hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    torch.manual_seed(7)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llamas saved by transformers (keys `model.layers...`, `lm_head.weight` only when untied) and a GPT-2,
    whose Conv1D weights are stored transposed (fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folders = {"untied": _llama(tmp_path_factory.mktemp("untied")),
               "tied": _llama(tmp_path_factory.mktemp("tied"), tied=True),
               "deeper": _llama(tmp_path_factory.mktemp("deeper"), layers=3),
               "wider": _llama(tmp_path_factory.mktemp("wider"), hidden=48)}
    torch.manual_seed(7)
    gpt2 = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(gpt2)
    folders["gpt2"] = gpt2
    return folders


def make_adapter(base: Path, out: Path, **options: Any) -> Path:
    """A LoRA adapter for `base` saved by peft, every A and B random (as after training: B is no longer zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(**{**LORA, **options}))
    torch.manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> torch.nn.Module:
    """The reference: base in float32 + adapter through peft, merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def streamed(base: Path, adapter: Path, out: Path, dtype: str = "float32", max_shard_bytes: int | None = None
             ) -> dict[str, torch.Tensor]:
    """Stream-merge into `out` (weights and config) and read every written tensor back."""
    plan = sm.make_plan(str(base), adapter)
    out.mkdir()
    sm.write(plan, out, dtype, max_shard_bytes)
    sm.copy_config(plan, out, dtype)
    return {k: v for path in sorted(out.glob("*.safetensors")) for k, v in load_file(path).items()}


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "r": 8, "lora_alpha": 4},
                                     {"rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                      "alpha_pattern": {"v_proj": 3, "o_proj": 20}}],
                         ids=["plain", "rslora", "patterns"])
def test_streaming_equals_peft_merge(bases: dict[str, Path], tmp_path: Path, options: dict[str, Any]) -> None:
    adapter = make_adapter(bases["untied"], tmp_path / "adapter", **options)
    got = streamed(bases["untied"], adapter, tmp_path / "out")
    reference = peft_merged(bases["untied"], adapter).state_dict()
    original = load_file(bases["untied"] / "model.safetensors")
    assert got.keys() == original.keys() == reference.keys()
    for key in got:
        torch.testing.assert_close(got[key], reference[key], atol=1e-6, rtol=0)
    moved = [k for k in got if not torch.equal(got[k], original[k])]
    assert len(moved) == 14  # 7 linear layers x 2 blocks: every adapted weight changed, nothing else
    if options.get("rank_pattern"):  # peft gave these modules other ranks; the merge used them
        pairs = load_file(adapter / "adapter_model.safetensors")
        assert pairs["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
        assert pairs["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape[0] == 6


def test_fan_in_fan_out_weights_are_merged_transposed(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = make_adapter(bases["gpt2"], tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"],
                           fan_in_fan_out=True)
    got = streamed(bases["gpt2"], adapter, tmp_path / "out")
    reference = peft_merged(bases["gpt2"], adapter).state_dict()
    assert "transformer.h.0.attn.c_attn.weight" in got and "lm_head.weight" not in got  # GPT-2 ties its head
    for key in got:
        torch.testing.assert_close(got[key], reference[key], atol=1e-6, rtol=0)


def test_tied_embeddings_stay_tied(bases: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(bases["tied"], tmp_path / "adapter")
    got = streamed(bases["tied"], adapter, tmp_path / "out")
    assert "lm_head.weight" not in got and "model.embed_tokens.weight" in got  # as in the base file: no copy
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, peft_merged(bases["tied"], adapter)(IDS).logits,
                                   atol=1e-5, rtol=0)
    # An adapter on the tied head is left to peft, whose merge changes the shared matrix: peft saves a copy of
    # the head with it; without that copy the base file has no head of its own, or holds one that is tied.
    head = make_adapter(bases["tied"], tmp_path / "head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(sm.StreamingUnsupported, match=r"lm_head\.base_layer\.weight \(a full base weight"):
        sm.make_plan(str(bases["tied"]), head)
    pairs = load_file(head / "adapter_model.safetensors")
    save_file({k: v for k, v in pairs.items() if "base_layer" not in k}, str(head / "adapter_model.safetensors"))
    with pytest.raises(sm.StreamingUnsupported, match="no weight for the adapter's module lm_head"):
        sm.make_plan(str(bases["tied"]), head)
    both = tmp_path / "both"
    both.mkdir()
    weights = load_file(bases["tied"] / "model.safetensors")
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()},
              str(both / "model.safetensors"), metadata={"format": "pt"})
    (both / "config.json").write_bytes((bases["tied"] / "config.json").read_bytes())
    with pytest.raises(sm.StreamingUnsupported, match="lm_head.weight, which may be tied"):
        sm.make_plan(str(both), head)


def test_shards_and_index_load_with_plain_transformers(bases: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(bases["untied"], tmp_path / "adapter")
    limit = 8_000  # bytes: a few tensors per file (the 96 x 32 embedding is 6 KiB in bfloat16)
    got = streamed(bases["untied"], adapter, tmp_path / "out", "bfloat16", max_shard_bytes=limit)
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(files) > 3 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(got) and set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert all(path.stat().st_size < limit + 1024 for path in files)  # the header is not counted in the limit
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    sharded_base = sm.make_plan(str(tmp_path / "out"), adapter)  # a sharded base is read through its index
    assert {key: file.name for key, (file, _, _) in sharded_base.tensors.items()} == index["weight_map"]
    reference = peft_merged(bases["untied"], adapter)
    for key, value in reference.state_dict().items():  # cast from the float32 merge: the same rounding, exactly
        assert torch.equal(got[key], value.to(torch.bfloat16)), key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        for param in reference.parameters():  # the weights rounded as written; buffers (RoPE) stay float32
            param.copy_(param.to(torch.bfloat16))
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options,reason", [
    ({"use_dora": True}, "uses use_dora"),
    ({"modules_to_save": ["lm_head"]}, "uses modules_to_save"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, r"embed_tokens\.lora_embedding_A \(embedding LoRA\)"),
    ({"base": "deeper"}, "no weight for the adapter's module model.layers.2"),
], ids=["dora", "modules_to_save", "embedding", "unmapped_key"])
def test_adapters_it_cannot_stream_are_refused_with_a_reason(bases: dict[str, Path], tmp_path: Path,
                                                             options: dict[str, Any], reason: str) -> None:
    options = dict(options)
    adapter = make_adapter(bases[options.pop("base", "untied")], tmp_path / "adapter", **options)
    with pytest.raises(sm.StreamingUnsupported, match=reason):
        sm.make_plan(str(bases["untied"]), adapter)


def test_an_adapter_of_another_shape_does_not_fit(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = make_adapter(bases["wider"], tmp_path / "adapter")
    with pytest.raises(LiteFTError, match="does not fit the base model"):
        sm.make_plan(str(bases["untied"]), adapter)


def test_reads_each_tensor_once_and_holds_one_at_a_time(bases: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor read from a file, and every merged tensor, is tracked until it is freed. When the next base
    tensor is read none may be alive: no shard buffer, no model, not even the previous tensor."""
    adapter = make_adapter(bases["untied"], tmp_path / "adapter")
    plan = sm.make_plan(str(bases["untied"]), adapter)
    alive: set[int] = set()
    numbers = itertools.count()
    reads: Counter[tuple[str, str]] = Counter()
    alive_at_base_reads, most_alive = [], 0
    real_read, real_merged = sm.read_tensor, sm.merged_tensor

    def watch(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal most_alive
        number = next(numbers)
        alive.add(number)
        weakref.finalize(tensor, alive.discard, number)
        most_alive = max(most_alive, len(alive))
        return tensor

    def read(path: Path, key: str) -> torch.Tensor:
        if path != plan.adapter_file:
            alive_at_base_reads.append(len(alive))
        reads[(path.name, key)] += 1
        return watch(real_read(path, key))

    monkeypatch.setattr(sm, "read_tensor", read)
    monkeypatch.setattr(sm, "merged_tensor", lambda *args: watch(real_merged(*args)))
    (tmp_path / "out").mkdir()
    sm.write(plan, tmp_path / "out", "float16")
    adapter_keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert reads == Counter({**{("model.safetensors", k): 1 for k in plan.tensors},
                             **{("adapter_model.safetensors", k): 1 for k in adapter_keys}})
    assert len(alive_at_base_reads) == len(plan.tensors) and set(alive_at_base_reads) == {0}
    assert most_alive <= 3  # W, A and B of one weight (the merged result replaces them)
    assert not alive


_RSS_SCRIPT = """
import json, sys
from pathlib import Path
import torch, peft, safetensors  # libraries first: their memory is not the merge's
from lite_ft.export import streaming as sm

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

base, adapter, out = map(Path, sys.argv[1:4])
plan = sm.make_plan(str(base), adapter)
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak (VmHWM) starts again from here
sm.write(plan, out, "float16")
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_peak_memory_is_about_one_tensor_not_the_model(tmp_path: Path) -> None:
    """Measured by the kernel in a fresh process: merging a 256 MiB base (64 weights of 4 MiB, all adapted) into
    float16 raises the peak RSS by a few tensors (23 MiB measured); loading the model would raise it by 256
    MiB, and holding the float16 output until a 5 GiB shard is full by 128 MiB."""
    from peft import LoraConfig

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"vocab_size": 96, "tie_word_embeddings": False}))
    generator = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(64)]
    save_file({f"{n}.weight": torch.randn(1024, 1024, generator=generator) for n in names},
              str(base / "model.safetensors"))
    LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]).save_pretrained(str(adapter))
    save_file({f"base_model.model.{n}.lora_{ab}.weight": torch.randn(*shape, generator=generator)
               for n in names for ab, shape in (("A", (4, 1024)), ("B", (1024, 4)))},
              str(adapter / "adapter_model.safetensors"))
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(base), str(adapter), str(tmp_path / "out")],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    growth_mib = (figures["peak"] - figures["before"]) / 2**20
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 128 * 2**20  # it did write the model
    assert growth_mib < 64, f"the merge raised the peak RSS by {growth_mib:.0f} MiB for a 256 MiB model"
