"""What an export says about itself: export.json (every figure, the hashes of what went in) and a README.md model
card stating the same for people."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from lite_ft.errors import LiteFTError
from lite_ft.export.gguf_check import card_section
from lite_ft.sources.catalog import CATALOG
from lite_ft.sources.resolve import resolve_source
from lite_ft.util import sha256_file, versions


def sha256_weights(folder: str | Path) -> dict[str, Any]:
    """sha256 of each weight file of a model folder and one digest over them all (name and hash, sorted); None
    for a Hub id, whose files are not local."""
    path = Path(folder)
    if not path.is_dir():
        return {"sha256": None, "files": {}, "note": "not a local folder"}
    files = {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}
    combined = hashlib.sha256("".join(f"{n} {h}\n" for n, h in files.items()).encode()).hexdigest()
    return {"sha256": combined, "files": files}


def write_record(folder: Path, record: dict[str, Any], run: Any) -> dict[str, Any]:
    """Complete `record` with the run's facts and write export.json and README.md into `folder`."""
    recipe = run.recipe
    base_path = run.base_path if run.is_adapter else _local_source(recipe)
    record.update(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), run_dir=str(run.folder.resolve()),
        task=recipe.task, method=recipe.method, training_quantization=recipe.model.quantization,
        base_model={"source": recipe.model.source, "resolved": base_path, **sha256_weights(base_path or "")},
        adapter={"path": str(run.weights.resolve()),
                 "sha256": sha256_file(run.weights / "adapter_model.safetensors")} if run.is_adapter else None,
        run_metrics=run.metrics, versions=versions())
    record["files"] = sorted({p.name for p in folder.iterdir()} | {"export.json", "README.md"})
    if not run.is_adapter:
        record["full_weights"] = {"path": str(run.weights.resolve()), **sha256_weights(run.weights)}
    (folder / "export.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    (folder / "README.md").write_text(model_card(record), encoding="utf-8")
    return record


def _local_source(recipe: Any) -> str | None:
    """Where a full run's base model is on this machine, if it is (the export itself does not need it)."""
    try:
        return resolve_source(recipe.model.source, recipe.model.allow_pickle)
    except LiteFTError:
        return None


def model_card(r: dict[str, Any]) -> str:
    """A README.md for people: what this is, what it came from (with hashes), how well it matches, how it scored."""
    v = r["verification"]
    base = r["base_model"]
    lines = ["---", "library_name: transformers", f"base_model: {base['source']}", "tags: [lite-ft, merged]", "---",
             "", f"# {Path(r['run_dir']).name} ({r['method']}, {r['task']}) exported by lite-ft", "",
             f"- Format: {r['format']}, {r['dtype']}" + (f" (`{r['gguf']['file']}`, Ollama `Modelfile` beside it)"
                                                     if r.get("gguf") else ""),
             f"- Base model: `{base['source']}` (weights sha256 `{base['sha256']}`)"]
    if base["source"] in CATALOG and CATALOG[base["source"]].base_note:
        lines.append(f"- Note: {CATALOG[base['source']].base_note}")
    if r["adapter"]:
        base_kind = {"4bit": "a 4-bit (NF4)", "8bit": "an 8-bit"}.get(r["training_quantization"], "an unquantized")
        lines.append(f"- Adapter: `{r['adapter']['path']}` (sha256 `{r['adapter']['sha256']}`), trained on "
                     f"{base_kind} base")
    lines += [f"- Merge: {r['merge_strategy']}", "", "## Verification", "",
              f"Logits on {v['prompts']} prompts ({v['prompt_source']}), compared with the model as trained; "
              f"pass bound {v['tolerance_relative']:g} x logit scale: {'passed' if v['passed'] else 'FAILED'}.", "",
              "| reference | max abs diff | mean abs diff | logit scale | greedy agreement |",
              "| --- | --- | --- | --- | --- |"]
    for name, f in v.items():
        if name.startswith("against_"):
            lines.append(f"| {name[8:].replace('_', ' ')} | {f['max_abs_diff']:.3g} | {f['mean_abs_diff']:.3g} | "
                         f"{f['logit_scale']:.3g} | {100 * f['greedy_agreement']:.1f}% |")
    if r.get("gguf"):
        lines += ["", *card_section(r["gguf"])]
    scores = r["run_metrics"].get("eval")
    if scores:
        shown = ", ".join(f"{k} {val:.2f}" if isinstance(val, float) else f"{k} {val}" for k, val in scores.items()
                          if not isinstance(val, dict))  # the intervals are in metrics.json
        lines += ["", "## Run metrics", "", f"Evaluation of the trained model (from metrics.json): {shown}."]
    cls = "AutoModelForSequenceClassification" if r["task"] == "classification" else "AutoModelForCausalLM"
    gguf = ', gguf_file="model.gguf"' if r.get("gguf") else ""
    lines += ["", "## Use", "", "```python", f"from transformers import {cls}, AutoTokenizer", "",
              f'model = {cls}.from_pretrained("THIS_FOLDER"{gguf})',
              f'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER"{gguf})', "```", ""]
    if r.get("gguf"):
        lines += ["With Ollama: `ollama create NAME -f Modelfile` in this folder.", ""]
    lines += ["Everything above is also in `export.json`.", ""]
    return "\n".join(lines)
