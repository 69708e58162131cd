"""Shared-prefix greedy decoding: prompts that begin alike are computed once up to where they differ, and the replies
are exactly those of decoding each prompt on its own (and of transformers' own generate)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lite_ft.data.tasks.causal import stop_ids
from lite_ft.data.tasks.generation import Run, eval_order, generate, runs_of

CPU = torch.device("cpu")


def test_runs_share_long_prefixes_only() -> None:
    passage = list(range(100, 140))
    batch = [passage + [1, 2], passage + [1, 3, 4], passage + [5], list(range(200, 230)), [7, 8, 9]]
    # The first three share the 40-token passage (and the two that start [1, ...] share one token more).
    assert runs_of(batch) == [Run(0, 3, 40), Run(3, 4, 29), Run(4, 5, 2)]
    # A prompt that is the prefix of another still leaves its last token out of the shared part.
    assert runs_of([passage, passage + [1]]) == [Run(0, 2, 39)]
    # Two prompts sharing a short head (a system prompt) are not worth sharing: two runs.
    assert len(runs_of([[1, 2] + list(range(50)), [1, 2] + list(range(60, 110))])) == 2


def test_eval_order_puts_prompts_of_one_passage_together() -> None:
    passage_a, passage_b = list(range(10, 50)), list(range(60, 100))
    prompts = [passage_a + [1], passage_b + [2], passage_a + [3], passage_b + [4, 5]]
    order = eval_order(prompts)
    assert {frozenset(order[:2]), frozenset(order[2:])} == {frozenset({0, 2}), frozenset({1, 3})}
    # A total order: any subset is ordered as it is within the whole.
    subset = [order[1], order[3]]
    assert [subset[i] for i in eval_order([prompts[i] for i in subset])] == subset


@pytest.fixture(scope="module")
def model_and_prompts(tiny_llama_dir: Path) -> tuple[Any, Any, list[list[int]]]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for p in model.parameters():  # sharper logits than the random init: answers that differ between prompts
        p.data.mul_(3.0)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    passages = ["Sunlight looks white, but it is a mixture of many colours that a prism spreads apart.",
                "The river floods every spring, and the town moved uphill a century ago."]
    questions = ["What spreads light?", "What does sunlight look like?", "Why?", "When does it flood?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{p}\n\nQuestion: {q}"}],
                                       add_generation_prompt=True, tokenize=True)["input_ids"]
               for p in passages for q in questions]
    return model, tok, [list(p) for p in prompts] + [list(tok("Dust and smoke.")["input_ids"])]


def test_shared_prefixes_give_the_replies_of_one_prompt_at_a_time(model_and_prompts: Any) -> None:
    model, tok, prompts = model_and_prompts
    ordered = [prompts[i] for i in eval_order(prompts)]
    assert any(r.end - r.start > 1 and r.shared > 10 for r in runs_of(ordered)), "the prompts should share"
    together = generate(model, tok, prompts, max_new_tokens=8, batch_size=len(prompts), device=CPU)
    alone = generate(model, tok, prompts, max_new_tokens=8, batch_size=1, device=CPU)
    assert together == alone
    assert len(set(alone)) > 1, "the replies should depend on the prompt"


def test_replies_equal_transformers_generate(model_and_prompts: Any) -> None:
    model, tok, prompts = model_and_prompts
    ours = generate(model, tok, prompts, max_new_tokens=8, batch_size=4, device=CPU)
    stops = stop_ids(tok)
    for prompt, reply in zip(prompts, ours):
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=8, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        tokens = out[0, len(prompt):].tolist()
        end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
        assert reply == tok.decode(tokens[:end], skip_special_tokens=True).strip()


def test_the_output_layer_gets_contiguous_rows(model_and_prompts: Any) -> None:
    """Only the last position reaches the output layer, as a contiguous tensor: PyTorch's CPU linear in bf16 copies
    the whole weight once per row for a strided one (1.35 GB for SmolLM2's output layer at 25 rows)."""
    model, tok, prompts = model_and_prompts
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        generate(model, tok, prompts, max_new_tokens=2, batch_size=4, device=CPU)
    finally:
        hook.remove()
    assert seen and all(x.shape[1] == 1 and x.is_contiguous() for x in seen)
