"""What a GGUF export proves in llama.cpp: the file loads without a warning, llama.cpp tokenizes a probe set exactly
as the Hugging Face tokenizer does, its stop tokens end generation there, and its logits on the run's eval examples
match the merged model within bounds that suit the file's type. A failed check fails the export.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lite_ft.data.batching import IGNORE
from lite_ft.data.load import load_splits
from lite_ft.data.tasks import get_task
from lite_ft.errors import LiteFTError
from lite_ft.export import llama_cpp
from lite_ft.export.verify import MAX_TOKENS, compare

# Texts that tokenize differently when a GGUF's pre-tokenizer, byte mapping or special tokens are wrong.
PROBES = {
    "digits": "0 1 2 3 4 5 6 7 8 9 10 42 123 1234 12345 1234567890 007 ٣٤ ½ ²",
    "numbers with separators": "1,234,567.89 3.14159 -42 +7 1e-5 12:30 2024-01-31 50% $1,000 1'000'000 10.000,5",
    "code with tabs and spaces": "def f(x):\n\tif x  >  1:\n\t\treturn x**2   # square\n    else:\n        return  None"
                                 "\n\n\n}\r\n",
    "runs of whitespace": "a  b   c    d\n\n\n e \t\t f\r\n g   ",
    "non-Latin scripts": "Привет, мир! Καλημέρα κόσμε. 你好，世界。こんにちは 안녕하세요 مرحبا بالعالم שלום नमस्ते สวัสดี",
    "emoji": "🚀 😶\u200d🌫️ 👍🏽 🇫🇷 ❤️ 🦙🦙 ✅ 👨\u200d👩\u200d👧",
    "contractions": "I'm sure you'll see we've said don't, can't, won't; she'd they're. 'S 'RE I'VE WE'LL it'D",
    "punctuation and case": "HELLO World!!! ...??? ---=== ''' ``` \"\"\" ((a+b)*c)/d camelCase HTTPServer naïve",
}
# Pass bounds by type. max_rel: max |logit difference| over the logit scale (None: reported only); top1: least
# share of compared positions (the next token after each eval prompt, and the teacher-forced final positions of
# the verification examples) whose top token agrees with the merged model's; exact: the same next token after every
# prompt and the same greedy continuation. f32 differs from PyTorch only in summation order; f16 rounds weights to
# 11 bits (SmolLM2: 0.2% of the scale). A broken quantized file agrees almost nowhere; a sound one loses agreement
# only where the merged model's top two tokens nearly tie (SmolLM2, whose 576-wide rows make llama.cpp fall back to
# q5_0 / q5_1 / q8_0 blocks for most matrices: 89-97%, README), so 85% passes every type.
BOUNDS = {"f32": {"max_rel": 1e-3, "top1": 0.99, "exact": True}, "f16": {"max_rel": 2e-2, "top1": 0.97, "exact": True},
          **{t: {"max_rel": None, "top1": 0.85, "exact": False} for t in ("q8_0", "q6_k", "q5_k_m", "q4_k_m")}}
PROMPTS = 8  # eval prompts whose next token is compared (each costs about 3 s on one core for a 135M model)
CONTINUED = 4  # of them, prompts whose greedy continuation is compared
CONTINUATION = 8  # tokens of it


def eval_prompts(recipe: Any, tokenizer: Any, fallback: list[list[int]]) -> list[list[int]]:
    """The prompt part (up to where the reply begins) of the first PROMPTS eval examples, as the task encodes
    them; `fallback` when the run's data cannot be read here."""
    task = get_task(recipe.task)
    try:
        train, evals = load_splits(recipe, task)
    except LiteFTError:
        return fallback
    prompts = []
    for example in (evals or train).examples:
        encoded = task.encode(example, tokenizer, recipe)
        if encoded:
            cut = next((i for i, label in enumerate(encoded["labels"]) if label != IGNORE), len(encoded["labels"]))
            prompts.append(list(encoded["input_ids"][:cut])[-MAX_TOKENS:])
        if len(prompts) == PROMPTS:
            break
    return prompts or fallback


@torch.no_grad()
def reference(model: torch.nn.Module, prompts: list[list[int]], stops: list[int]) -> dict[str, Any]:
    """The merged model's next-token logits after each prompt, and its greedy continuation of the first
    CONTINUED prompts (CONTINUATION tokens, up to a stop token)."""
    model.eval()
    nexts, continuations = [], []
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids])
        if i >= CONTINUED:
            nexts.append(model(input_ids=x).logits[0, -1:].float().clone())
            continue
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=CONTINUATION,
                             do_sample=False, eos_token_id=stops, pad_token_id=stops[0] if stops else None,
                             temperature=None, top_p=None, top_k=None, output_logits=True,
                             return_dict_in_generate=True)
        nexts.append(out.logits[0].float().clone())  # the first step's logits: the next token after the prompt
        new = out.sequences[0, len(ids):].tolist()
        continuations.append(new[:next((k for k, t in enumerate(new) if t in stops), len(new))])
    return {"prompts": prompts, "next": nexts, "continuations": continuations, "stops": stops}


def probe_texts(tokenizer: Any) -> dict[str, str]:
    """PROBES plus a system + user + assistant conversation rendered by the chat template (special tokens)."""
    texts = dict(PROBES)
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Don't  panic: 2+2?"},
                {"role": "assistant", "content": "4, I'd say."}]
        texts["chat template"] = tokenizer.apply_chat_template(chat, tokenize=False)
    return texts


def check_tokens(engine: Any, tokenizer: Any) -> dict[str, Any]:
    """llama.cpp's ids against transformers' on every probe (also with the tokenizer's own BOS/EOS added)."""
    wrong = {}
    texts = probe_texts(tokenizer)
    for name, text in texts.items():
        expected = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        got = engine.tokenize(text, add_special=False)
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            wrong[name] = f"from token {first}: llama.cpp {got[first:first + 4]}, transformers " \
                          f"{expected[first:first + 4]}"
    framed = list(tokenizer("Hello world")["input_ids"])
    if engine.tokenize("Hello world", add_special=True) != framed:
        wrong["BOS/EOS added"] = f"llama.cpp {engine.tokenize('Hello world', add_special=True)}, " \
                                 f"transformers {framed}"
    return {"probes": len(texts) + 1, "identical": not wrong, "differences": wrong}


def _perplexity(rows: list[torch.Tensor], sequences: list[list[int]]) -> float:
    """exp(mean NLL) of each sequence's actual next tokens under the logits of its last positions."""
    nll, count = 0.0, 0
    for logits, ids in zip(rows, sequences):
        targets = torch.tensor(ids[len(ids) - logits.shape[0] + 1:])
        logp = torch.log_softmax(logits[:-1].double(), -1)
        nll -= float(logp.gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(nll / max(count, 1))


def check(path: Path, tokenizer: Any, gguf_type: str, sequences: list[list[int]], merged: list[torch.Tensor],
          ref: dict[str, Any]) -> dict[str, Any]:
    """Load `path` in llama.cpp and run every check against the merged model (`merged`: its logits on the final
    positions of `sequences`; `ref`: reference()); the figures, or LiteFTError naming what failed."""
    width = max(len(s) for s in [*sequences, *ref["prompts"]]) + CONTINUATION + 8
    with llama_cpp.open_gguf(path, n_ctx=max(64, width)) as engine:
        tokens = check_tokens(engine, tokenizer)
        got = [torch.from_numpy(engine.logits(ids, logits.shape[0])) for ids, logits in zip(sequences, merged)]
        nexts = [torch.from_numpy(engine.logits(ids, 1)) for ids in ref["prompts"]]
        continuations = [engine.greedy(ids, CONTINUATION, set(ref["stops"])) for ids in ref["prompts"][:CONTINUED]]
        stops_end = all(engine.is_eog(t) for t in ref["stops"])
        warnings = engine.load_warnings
    next_token = compare(ref["next"], nexts)
    positions = {**compare(merged, got), "perplexity": {"gguf": _perplexity(got, sequences),
                                                        "merged": _perplexity(merged, sequences)}}
    worst = max(next_token["relative_max_diff"], positions["relative_max_diff"])
    bound = BOUNDS[gguf_type]
    same_next = round(next_token["greedy_agreement"] * len(nexts))
    agree = (same_next + positions["greedy_agreement"] * positions["positions"]) / (len(nexts) + positions["positions"])
    result = {"engine": llama_cpp.version(), "load_warnings": warnings, "tokens": tokens,
              "stop_tokens_end_generation": stops_end, "prompts": len(nexts), "same_next_token": same_next,
              "top1_agreement": agree,
              "continued": len(continuations),
              "same_continuation": sum(a == b for a, b in zip(continuations, ref["continuations"])),
              "max_abs_diff": max(next_token["max_abs_diff"], positions["max_abs_diff"]),
              "logit_scale": max(next_token["logit_scale"], positions["logit_scale"]), "relative_max_diff": worst,
              "next_token": next_token, "positions": positions, "bounds": bound}
    failures = _failures(result, bound)
    result["passed"] = not failures
    if failures:
        raise LiteFTError(f"the {gguf_type} GGUF failed its check in {result['engine']}: {'; '.join(failures)}; "
                          "nothing was written")
    return result


def _failures(r: dict[str, Any], bound: dict[str, Any]) -> list[str]:
    out = [f"llama.cpp warned while loading it: {' | '.join(r['load_warnings'])[:400]}"] if r["load_warnings"] else []
    if not r["tokens"]["identical"]:
        out.append(f"token ids differ from transformers on {', '.join(r['tokens']['differences'])} "
                   f"({next(iter(r['tokens']['differences'].values()))})")
    if not r["stop_tokens_end_generation"]:
        out.append("the model's stop tokens do not end generation in llama.cpp")
    if bound["max_rel"] is not None and r["relative_max_diff"] > bound["max_rel"]:
        out.append(f"max |logit difference| {r['max_abs_diff']:.4g} is {100 * r['relative_max_diff']:.2f}% of the "
                   f"logit scale {r['logit_scale']:.3g} (bound {100 * bound['max_rel']:g}%)")
    if r["top1_agreement"] < bound["top1"]:
        out.append(f"top-1 agreement with the merged model {100 * r['top1_agreement']:.1f}% (at least "
                   f"{100 * bound['top1']:g}%)")
    if bound["exact"] and (r["same_next_token"] < r["prompts"] or r["same_continuation"] < r["continued"]):
        out.append(f"the same next token after {r['same_next_token']} of {r['prompts']} eval prompts and the same "
                   f"greedy continuation after {r['same_continuation']} of {r['continued']} (all required)")
    return out


def card_section(g: dict[str, Any]) -> list[str]:
    """The model card's lines on the GGUF file: how it was checked and the figures, or that llama.cpp did not."""
    if "llama_cpp" not in g:
        trip = g["roundtrip"]
        return [f"GGUF read back with transformers against the merged float32 model: max abs diff "
                f"{trip['max_abs_diff']:.3g}, greedy agreement {100 * trip['greedy_agreement']:.1f}% (bound "
                f"{trip['bound']:.3g}). {g['checked_in'].split('; ', 1)[-1].capitalize()}."]
    c, t = g["llama_cpp"], g["tokenizer"]
    n, p = c["next_token"], c["positions"]
    return [f"Checked in {c['engine']} against the merged float32 model: loads without warnings; pre-tokenizer "
            f"`{t['pre']}` ({t['pre_from']}); token ids identical to transformers on {c['tokens']['probes']} probes "
            "(digits, numbers, code, whitespace, scripts, emoji, contractions, chat template); top-1 agreement "
            f"{100 * c['top1_agreement']:.1f}% (bound {100 * c['bounds']['top1']:g}%); greedy continuation equal "
            f"after {c['same_continuation']} of {c['continued']} prompts.", "",
            "| logits compared | max abs diff | of logit scale | top-1 agreement | perplexity (GGUF / merged) |",
            "| --- | --- | --- | --- | --- |",
            f"| next token after {c['prompts']} eval prompts | {n['max_abs_diff']:.3g} | "
            f"{100 * n['relative_max_diff']:.2f}% | {100 * n['greedy_agreement']:.1f}% | |",
            f"| {p['positions']} teacher-forced positions | {p['max_abs_diff']:.3g} | "
            f"{100 * p['relative_max_diff']:.2f}% | {100 * p['greedy_agreement']:.1f}% | "
            f"{p['perplexity']['gguf']:.4g} / {p['perplexity']['merged']:.4g} |", "",
            "In llama.cpp: `llama-cli -m model.gguf -cnv` or `llama-server -m model.gguf --jinja`."]
