"""An Ollama Modelfile for a GGUF export: FROM the file, the chat template as a Go template, stop tokens.

The Go template is derived by rendering the model's own Jinja chat template with marker messages and putting
Ollama's `{{ .System }}`, `{{ .Prompt }}` and `{{ .Response }}` where the markers land. Ollama renders such a
template once per turn (System, Prompt, Response), and for the turn it prompts a reply for it drops whatever
follows `{{ .Response }}`; so the template is one turn, `{{ .Response }}` appears once at its top level, and the
system block is rendered only when there is a system text. A default system text that the Jinja template inserts
when there is none becomes the Modelfile's SYSTEM line, which Ollama passes for the first turn only, as the Jinja
template does. The result renders the same text as transformers for system + user + assistant conversations, one
turn or several; templates that do not fit this shape get a plain `{{ .Prompt }}` template, and export.json says so.
"""
from __future__ import annotations

import json
from typing import Any

FILE = "Modelfile"
_S, _P, _R, _P2, _R2 = "\x01SYSTEM\x01", "\x01PROMPT\x01", "\x01RESPONSE\x01", "\x01PROMPT2\x01", "\x01RESPONSE2\x01"
_GO = {_S: "{{ .System }}", _P: "{{ .Prompt }}", _R: "{{ .Response }}"}
_PLAIN = "{{ .Prompt }}"


def _render(tokenizer: Any, messages: list[tuple[str, str]], generation: bool = False) -> str | None:
    chat = [{"role": role, "content": content} for role, content in messages]
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
    except Exception:  # a template may refuse a system turn or a message order; jinja raises many types
        return None


def _go(text: str) -> str:
    for marker, field in _GO.items():
        text = text.replace(marker, field)
    return text


def _user_start(tokenizer: Any) -> str | None:
    """The text that opens a user turn, from a two-turn rendering: what lies between the first reply and the
    second prompt, less what closes a reply."""
    two = _render(tokenizer, [("user", _P), ("assistant", _R), ("user", _P2), ("assistant", _R2)])
    if two is None or any(two.count(m) != 1 for m in (_P, _R, _P2, _R2)):
        return None
    between, closing = two[two.index(_R) + len(_R):two.index(_P2)], two[two.index(_R2) + len(_R2):]
    return between[len(closing):] if between.startswith(closing) else None


def template(tokenizer: Any) -> tuple[str, str | None, str]:
    """(Go template, default system text or None, how it was made)."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return _PLAIN, None, "no chat template: the prompt is passed as it is"
    bare = _render(tokenizer, [("user", _P), ("assistant", _R)])
    prompt = _render(tokenizer, [("user", _P)], generation=True)
    start = _user_start(tokenizer)
    if bare is None or prompt is None or start is None or bare[:bare.find(_R)] != prompt or "{{" in bare \
            or not bare[:bare.find(_P)].endswith(start):
        return _PLAIN, None, "the chat template does not render turns as fixed text around the messages"
    full = _render(tokenizer, [("system", _S), ("user", _P), ("assistant", _R)])
    with_prompt = _render(tokenizer, [("system", _S), ("user", _P)], generation=True)
    rest = bare[bare.index(_P) - len(start):]  # the turn itself: user opening, prompt, reply, closing
    system_block, default_block = full[:len(full) - len(rest)] if full else "", bare[:len(bare) - len(rest)]
    if full is None or with_prompt is None or not full.endswith(rest) or system_block.count(_S) != 1 or \
            full[:full.index(_R)] != with_prompt:
        return _go(rest if not default_block else bare), None, "rendered from the chat template (no system turn)"
    before, after = system_block.split(_S)
    head = "{{ if .System }}" + _go(system_block)
    if not default_block:
        return head + "{{ end }}" + _go(rest), None, "rendered from the chat template with marker messages"
    if default_block.startswith(before) and default_block.endswith(after) and \
            len(default_block) > len(before) + len(after):
        default = default_block[len(before):len(default_block) - len(after)]
        return head + "{{ end }}" + _go(rest), default, "rendered from the chat template with marker messages"
    return (head + "{{ else }}" + default_block + "{{ end }}" + _go(rest), None,
            "rendered from the chat template; its default system block is repeated on every turn")


def modelfile(tokenizer: Any, gguf_file: str) -> tuple[str, dict[str, Any]]:
    """The Modelfile text, and what it holds (for export.json)."""
    text, default, how = template(tokenizer)
    if '"""' in text or '"""' in (default or ""):  # a Modelfile string cannot hold triple quotes
        text, default, how = _PLAIN, None, "the chat template holds triple quotes, which a Modelfile cannot"
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in text]
    stops = list(dict.fromkeys([t for t in [tokenizer.eos_token, *specials] if t]))
    lines = [f"FROM ./{gguf_file}", "", f'TEMPLATE """{text}"""']
    if default:
        lines.append(f'SYSTEM """{default}"""')
    lines += [""] + [f"PARAMETER stop {json.dumps(t)}" for t in stops]
    return "\n".join(lines) + "\n", {"file": FILE, "template": how, "default_system": default, "stops": stops}
