"""llama.cpp itself, through the cyllama wheel (the optional extra `gguf-check`: `pip install -e ".[gguf-check]"`):
load a GGUF file as llama.cpp does, tokenize, per-position logits, greedy decoding, and llama.cpp's own quantizer.

What the wheel needs (cyllama 0.2.x): the model object must carry `n_vocab` before logits are read; the context,
batch, vocabulary and model are freed in that order, or the process crashes at exit; one thread, since torch
holds its own threads in the same process. llama.cpp's log lines are caught: a warning or error while a file
loads fails the check, and nothing is printed.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lite_ft.errors import LiteFTError

INSTALL = 'pip install --only-binary=:all: cyllama==0.2.18 (or pip install -e ".[gguf-check]")'
# llama.cpp's quantizer types, by --gguf-type; the input is always an f16 file.
QUANTIZER_TYPES = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
                   "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}
_WARN, _ERROR, _CONT = 3, 4, 5  # ggml_log_level: a CONT line continues the previous message
_LOG: list[str] = []  # llama.cpp's warnings and errors, in order; its other log lines are dropped
_LAST = [0]  # level of the last message, for CONT lines


def version() -> str | None:
    """'llama.cpp bNNNN (cyllama X)' when the extra is installed, else None (nothing is imported)."""
    spec = importlib.util.find_spec("cyllama")
    if spec is None or spec.origin is None:
        return None
    config = Path(spec.origin).parent / "build_config.json"
    release = "?"
    if config.is_file():
        release = json.loads(config.read_text(encoding="utf-8")).get("versions", {}).get("llama_cpp_version", "?")
    return f"llama.cpp {release} (cyllama {md.version('cyllama')})"


def _cy() -> Any:
    """The compiled llama.cpp module, its logs routed to _LOG (imported here: the extra is optional and loading
    it costs a second)."""
    try:
        from cyllama.llama import llama_cpp as cy
    except ImportError:
        raise LiteFTError(f"llama.cpp is not installed for this check; {INSTALL}") from None
    if not getattr(cy, "_lite_ft_logs", False):
        cy.set_log_callback(_record)
        cy.ggml_backend_load_all()
        cy._lite_ft_logs = True
    return cy


def _record(level: Any, text: str) -> None:
    level = int(level)
    if level == _CONT:
        if _LAST[0] in (_WARN, _ERROR) and _LOG:
            _LOG[-1] += text
        return
    _LAST[0] = level
    if level in (_WARN, _ERROR):
        _LOG.append(text)


def _problems(start: int) -> list[str]:
    """Warnings and errors llama.cpp logged since _LOG[start], one line each."""
    return [" ".join(t.split()) for t in _LOG[start:] if t.strip()]


class Engine:
    """One GGUF file loaded in llama.cpp, with a context for up to `n_ctx` tokens."""

    def __init__(self, path: Path, n_ctx: int) -> None:
        cy = _cy()
        self._cy = cy

        class Model(cy.LlamaModel):  # cyllama 0.2.x reads model.n_vocab in its logits calls
            n_vocab = 0

        start = len(_LOG)
        params = cy.LlamaModelParams()
        params.n_gpu_layers = 0
        try:
            self.model = Model(str(path), params)
        except Exception as exc:  # cyllama raises ValueError or RuntimeError with llama.cpp's reason in the log
            raise LiteFTError(f"llama.cpp cannot load {path.name}: {'; '.join(_problems(start)) or exc}") from None
        self.vocab = self.model.get_vocab()
        self.n_vocab = self.model.n_vocab = self.vocab.n_vocab
        self.load_warnings = _problems(start)
        ctx = cy.LlamaContextParams()
        ctx.n_ctx = ctx.n_batch = ctx.n_ubatch = n_ctx
        ctx.n_threads = ctx.n_threads_batch = 1
        # A float32 KV cache (llama.cpp's default is f16): the check then measures the file, not the cache.
        ctx.type_k = ctx.type_v = int(gguf.GGMLQuantizationType.F32)
        ctx.flash_attn_type = 0
        ctx.no_perf = True
        self.ctx = cy.LlamaContext(self.model, ctx)
        self.batch = cy.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1)
        self.n_ctx = n_ctx

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama.cpp's token ids of `text`, special tokens in it parsed as such (as transformers does)."""
        return list(self.vocab.tokenize(text, add_special=add_special, parse_special=True))

    def _decode(self, ids: list[int], start: int, outputs: int) -> None:
        """Run ids at positions start.. through the model, logits for the last `outputs` of them."""
        self.batch.clear()
        for i, token in enumerate(ids):
            self.batch.add(int(token), start + i, [0], i >= len(ids) - outputs)
        self.ctx.decode(self.batch)

    def logits(self, ids: list[int], last: int) -> np.ndarray:
        """float32 logits [min(last, len(ids)), n_vocab] of the final positions of one sequence, from scratch."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        self.ctx.kv_cache_clear()
        n = min(last, len(ids))
        self._decode(ids, 0, n)
        return np.array([self.ctx.get_logits_ith(i) for i in range(len(ids) - n, len(ids))], dtype=np.float32)

    def greedy(self, ids: list[int], max_new: int, stops: set[int]) -> list[int]:
        """Greedy continuation of `ids`, up to max_new tokens or the first stop token (not included)."""
        self.ctx.kv_cache_clear()
        self._decode(ids, 0, 1)
        out: list[int] = []
        pos = len(ids)
        while len(out) < max_new and pos < self.n_ctx:
            token = int(np.argmax(np.array(self.ctx.get_logits_ith(-1), dtype=np.float32)))
            if token in stops:
                break
            out.append(token)
            self._decode([token], pos, 1)
            pos += 1
        return out

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids, special tokens left out."""
        return self.vocab.detokenize(list(ids), remove_special=True, unparse_special=False)

    def is_eog(self, token: int) -> bool:
        return bool(self.vocab.is_eog(int(token)))

    def close(self) -> None:
        """Free in the order the wheel needs: batch, context, vocabulary, model."""
        for name in ("batch", "ctx"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
                setattr(self, name, None)
        self.vocab = None
        if getattr(self, "model", None) is not None:
            self.model.close()
            self.model = None


@contextmanager
def open_gguf(path: Path, n_ctx: int = 512) -> Iterator[Engine]:
    """A GGUF file loaded in llama.cpp for the duration of the block."""
    engine = Engine(Path(path), n_ctx)
    try:
        yield engine
    finally:
        engine.close()


def quantize(source: Path, target: Path, gguf_type: str) -> dict[str, Any]:
    """llama.cpp's quantizer: the f16 file `source` -> `target` in gguf_type (q4_k_m, q5_k_m, q6_k). Returns the
    warnings it logged (e.g. tensors whose rows are not whole blocks of 256 fall back to another type)."""
    cy = _cy()
    params = cy.LlamaModelQuantizeParams()
    params.ftype = int(QUANTIZER_TYPES[gguf_type])
    params.nthread = 1
    start = len(_LOG)
    try:
        cy.model_quantize(str(source), str(target), params)
    except RuntimeError as exc:
        raise LiteFTError(f"llama.cpp's quantizer failed for {gguf_type}: {'; '.join(_problems(start)) or exc}"
                          ) from None
    warnings = _problems(start)  # two lines per tensor that fell back to another type, then a summary line
    if len(warnings) > 6:
        warnings = [*warnings[:4], f"... {len(warnings) - 5} more", warnings[-1]]
    return {"quantizer": version(), "from": "f16", "warnings": warnings}
