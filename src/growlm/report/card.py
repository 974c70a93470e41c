"""The model card of a run: `README.md` with Hugging Face front matter (`ModelCardData`, a model-index of
every evaluated metric) and sections built from the run directory alone (`growlm.report.run`).

Every number is printed by one of the `fmt_*` functions below from a value in metrics.jsonl (or the
saved config / eval results), so a test can recompute each cell from the same file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from growlm.io import atomic_write
from growlm.models.config import module_diff, module_lines
from growlm.report import plots
from growlm.report.run import RunData

# base models whose hub id and licence are known offline (growlm's embedded presets)
KNOWN_BASES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
EVAL_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
PLOT_DIR = "report"


# -- number formats (one per kind of number) ------------------------------------------------------------
def fmt_loss(x: float | None) -> str:
    return "—" if x is None else f"{x:.6f}"


def fmt_ppl(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def fmt_int(x: float | None) -> str:
    return "—" if x is None else f"{int(x):,}"


def fmt_sci(x: float | None) -> str:
    return "—" if x is None else f"{x:.3e}"


def fmt_delta(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2e}"


def ppl(loss: float | None) -> float | None:
    return None if loss is None or loss > 700 else math.exp(loss)


def _table(head: list[str], rows: list[list[str]], right: int = 1) -> str:
    align = ["---" if i < right else "---:" for i in range(len(head))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, align, *rows])


# -- what the run was ------------------------------------------------------------------------------------
def base_model(run: RunData) -> tuple[str | None, str]:
    """(hub id of the starting model (a distillation's teacher) or None, licence) from the saved config."""
    name, init = run.value("model.name"), run.value("model.init")
    if run.value("distill.teacher"):
        name, init = run.value("distill.teacher"), "pretrained"
    if init != "pretrained" or not isinstance(name, str):
        return None, "apache-2.0"  # trained from scratch: growlm's own licence
    if name in KNOWN_BASES:
        return KNOWN_BASES[name]
    if name.count("/") == 1 and not os.path.exists(name) and not name.endswith(".gguf"):
        return name, "other"  # a hub id
    return None, "other"


def dataset_name(run: RunData) -> str:
    path = run.value("data.path")
    return "shakespeare" if not path else Path(str(path)).name


def summary_sentence(run: RunData) -> str:
    name, init = run.value("model.name", "?"), run.value("model.init")
    steps = (run.last or {}).get("step", 0)
    tokens = (run.last or {}).get("tokens", 0)
    ops = ", ".join(f"{e.get('operator')} at step {e.get('step')}" for e in run.growth)
    start = f"`{name}` trained from scratch" if init == "scratch" else f"continued pretraining of `{name}`"
    if run.value("distill.teacher"):
        start = f"knowledge distillation from the teacher `{run.value('distill.teacher')}` into {student_text(run)}"
    parts = [start]
    if run.growth:
        parts.append(f"grown {len(run.growth)} time{'s' * (len(run.growth) != 1)} during training ({ops})")
    if (run.value("reg.kd_weight") or 0) > 0:
        parts.append(f"with knowledge distillation from the pre-growth model (weight {run.value('reg.kd_weight')})")
    if (run.value("reg.ewc_lambda") or 0) > 0:
        parts.append(f"with EWC (lambda {run.value('reg.ewc_lambda')})")
    return (f"This model is the result of {', '.join(parts)}: {fmt_int(steps)} steps, {fmt_int(tokens)} tokens "
            f"of {dataset_name(run)}.")


def student_text(run: RunData) -> str:
    """'a student cut from it (layers 0, 3, ... kept; 10 of 30)' or 'a student (model section)'."""
    d = run.distill or {}
    how, t, s = d.get("student") or {}, d.get("teacher_config") or {}, d.get("student_config") or {}
    if how.get("init") == "random":
        return f"a randomly initialised student of {s.get('n_layer')} layers"
    if how.get("kept_layers") is not None:
        return (f"a student cut from it ({len(how['kept_layers'])} of its {t.get('n_layer')} layers kept: "
                f"{', '.join(map(str, how['kept_layers']))}; n_embd {s.get('n_embd')}, ffn {s.get('ffn_size')})")
    return f"the student `{run.value('model.name', '?')}`"


def _spec_text(e: dict[str, Any]) -> str:
    spec = e.get("spec") or {}
    keys = {"depth": ("n", "where", "layers", "init"), "stack": ("n", "where", "layers"),
            "width": ("factor", "n_embd", "n_head", "n_kv_head", "ffn_size", "head_dim"),
            "vocab": ("vocab_size",)}.get(str(e.get("operator")), tuple(spec))
    return " ".join(f"{k}={spec[k]}" for k in keys if spec.get(k) is not None and k != "operator")


# -- architecture ------------------------------------------------------------------------------------------
def architecture(run: RunData) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config before the first growth event, config after the last); the export's when there was none; a
    distillation's teacher and student (before the student's first growth event)."""
    if run.distill and run.distill.get("teacher_config"):
        return run.distill["teacher_config"], run.growth[-1].get("after", {}) if run.growth else run.distill.get("student_config", {})
    if run.growth:
        return run.growth[0].get("before", {}), run.growth[-1].get("after", {})
    cfg: dict[str, Any] = {}
    if run.hf_dir is not None and (run.hf_dir / "growlm_config.json").is_file():
        cfg = json.loads((run.hf_dir / "growlm_config.json").read_text())
    return cfg, cfg


def architecture_section(run: RunData) -> str:
    before, after = architecture(run)
    if not before:
        return "## Architecture\n\nUnknown (no growth event and no exported config)."
    keys = [k for k in after if not isinstance(after[k], (dict, list))]
    rows = [[k, str(before.get(k)), str(after.get(k))] for k in keys]
    a, b = ("teacher", "student") if run.distill else ("before", "after")
    diff = module_diff(before, after, (a, b))
    out = ["## Architecture", "", _table(["field", a, b], rows, right=1), ""]
    if diff:
        out += [f"Module diff ({a} -> {b}):", "", "```diff", *diff, "```"]
    else:
        out += ["No growth: the architecture is unchanged.", "", "```", *module_lines(after), "```"]
    return "\n".join(out)


def growth_section(run: RunData) -> str:
    init, fin = run.initial or (run.train[0] if run.train else {}), run.last or {}
    out = ["## Parameters and growth events", "",
           _table(["parameters", "total", "trainable"], [["start", fmt_int(init.get("params")), fmt_int(init.get("trainable_params"))],
                                              ["end", fmt_int(fin.get("params")), fmt_int(fin.get("trainable_params"))]])]
    if not run.growth:
        return "\n".join(out + ["", "No growth events."])
    rows = []
    for e in run.growth:
        b, a = e.get("before", {}), e.get("after", {})
        rows.append([str(e.get("event")), str(e.get("step")), str(e.get("operator")), _spec_text(e),
                     f"{b.get('n_layer')} -> {a.get('n_layer')}", f"{b.get('n_embd')} -> {a.get('n_embd')}",
                     f"{fmt_int(e.get('params_before'))} -> {fmt_int(e.get('params_after'))}",
                     fmt_int(e.get("params_added")), fmt_int(e.get("trainable_params")),
                     fmt_loss(e.get("val_loss_before")), fmt_loss(e.get("val_loss_after")), fmt_delta(e.get("val_loss_delta")),
                     {True: "yes", False: "no"}.get(e.get("function_preserving"), "?")])
    head = ["event", "step", "operator", "spec", "layers", "n_embd", "params", "added", "trainable",
            "val loss before", "val loss after", "delta", "function-preserving"]
    return "\n".join(out + ["", "Growth events (validation loss measured just before and just after each):", "",
                            _table(head, rows, right=4)])


# -- metrics -----------------------------------------------------------------------------------------------
def eval_rows(run: RunData) -> list[tuple[str, str, float, float | None, int | None]]:
    """(task, metric, value, stderr, n) for every numeric score in the run's eval results."""
    out = []
    for task, r in ((run.evals or {}).get("results") or {}).items():
        for m in EVAL_METRICS:
            v = r.get(m)
            if isinstance(v, (int, float)) and math.isfinite(v):
                se = r.get(f"{m}_stderr")
                out.append((task, m, float(v), se if isinstance(se, (int, float)) and math.isfinite(se) else None, r.get("n")))
    return out


def metrics_section(run: RunData) -> str:
    rows = []
    for label, r in (("initial", run.initial), ("final", run.final), ("best", run.best)):
        if r is not None:
            rows.append([label, str(r.get("step")), fmt_loss(r.get("val_loss")), fmt_ppl(r.get("val_ppl")),
                         fmt_loss(r.get("loss"))])
    out = ["## Summary metrics", ""]
    out.append(_table(["evaluation", "step", "val loss", "val perplexity", "train loss"], rows) if rows else "No evaluation was logged.")
    base_name = "base model (step 0)" if run.value("model.init") == "pretrained" else "initialisation (step 0)"
    res = []
    i, f = run.initial, run.final
    if i and f:
        res.append(["validation perplexity", fmt_ppl(i.get("val_ppl")), fmt_ppl(f.get("val_ppl"))])
        res.append(["validation loss (nats/token)", fmt_loss(i.get("val_loss")), fmt_loss(f.get("val_loss"))])
    if "base" in run.retention or "final" in run.retention:
        res.append(["retention perplexity (Python language reference)", fmt_ppl(ppl(run.retention.get("base"))),
                    fmt_ppl(ppl(run.retention.get("final")))])
    for task, m, v, se, n in eval_rows(run):
        res.append([f"{task} {m} (n={n})", "—", f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else "")])
    if res:
        out += ["", f"Results, {base_name} vs final model:", "", _table(["measure", base_name, "final"], res)]
    return "\n".join(out)


def teacher_section(run: RunData) -> str:
    """Teacher vs student: parameters and validation perplexity (metrics.jsonl), generation speed and eval
    tasks (distill_results.json, when `growlm distill` measured them)."""
    d, r = run.distill or {}, run.distill_results or {}
    te, st = r.get("teacher") or {}, r.get("student") or {}
    fin = run.final or {}
    rows = [["parameters", fmt_int(d.get("teacher_params")), fmt_int(d.get("student_params"))],
            ["validation perplexity (student: final)", fmt_ppl(ppl(d.get("teacher_val_loss"))), fmt_ppl(fin.get("val_ppl"))]]
    if "gen_tok_s" in te and "gen_tok_s" in st:
        rows.append(["generation tokens/s (greedy, batch 1)", f"{te['gen_tok_s']:.1f}", f"{st['gen_tok_s']:.1f}"])
    for task, tr in (te.get("results") or {}).items():
        for m in EVAL_METRICS:
            if isinstance(tr.get(m), (int, float)) and isinstance(((st.get("results") or {}).get(task) or {}).get(m), (int, float)):
                rows.append([f"{task} {m} (n={tr.get('n')})", f"{tr[m]:.4f}", f"{st['results'][task][m]:.4f}"])
    how = f"Teacher targets: {d.get('targets')}" + (f" (top-{d.get('top_k')} cache)" if d.get("top_k") else "") + "."
    return "\n".join(["## Teacher vs student", "", _table(["measure", "teacher", "student"], rows), "", how])


def eval_results(run: RunData) -> list[EvalResult]:
    """The model-index: every metric evaluated on the final model (validation and retention perplexity,
    validation loss, eval task scores), values exactly as logged."""
    data, out = dataset_name(run), []
    f = run.final
    if f is not None:
        for mtype, mname, v in (("perplexity", "validation perplexity", f.get("val_ppl")),
                                ("loss", "validation loss", f.get("val_loss"))):
            if v is not None:
                out.append(EvalResult(task_type="text-generation", dataset_type=data, dataset_name=f"{data} (validation split)",
                                      dataset_split="validation", metric_type=mtype, metric_name=mname, metric_value=v))
    if run.retention.get("final") is not None:
        out.append(EvalResult(task_type="text-generation", dataset_type="pydoc_data.topics",
                              dataset_name="Python language reference (retention)", metric_type="perplexity",
                              metric_name="retention perplexity", metric_value=ppl(run.retention["final"])))
    for task, m, v, _, _ in eval_rows(run):
        out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=m,
                              metric_name=f"{task} {m}", metric_value=v))
    return out


# -- configuration, resources, usage -------------------------------------------------------------------------
def resources_section(run: RunData) -> str:
    m, last = run.machine, run.last or {}
    wall, note = run.wall_s, run.wall_note()
    segs = f", {len(run.segments)} segments" if len(run.segments) > 1 else ""
    mems = [r["peak_mem_mb"] for r in run.train + run.ends if isinstance(r.get("peak_mem_mb"), (int, float))]
    mfus = [r["mfu"] for r in run.train if isinstance(r.get("mfu"), (int, float))]
    tok_s = [r["tok_s"] for r in run.train if isinstance(r.get("tok_s"), (int, float))]
    rows = [[f"wall time (training{segs})", ("—" if wall is None else f"{wall:.1f} s") + (f" ({note})" if note else "")],
            ["peak memory", "—" if not mems else f"{max(mems):.0f} MB"],
            ["device", str(m.get("gpu") or m.get("device", "—")) + (f" x {m['world']}" if m.get("world", 1) > 1 else "")],
            ["CPU", f"{m.get('cpu', '—')} ({m.get('cpu_count', '—')} cores, {m.get('torch_threads', '—')} torch threads)"],
            ["dtype", f"{m.get('dtype', run.value('run.dtype', '—'))}, autocast {m.get('autocast', run.value('run.autocast', '—'))}"],
            ["tokens", fmt_int(last.get("tokens"))],
            ["executed FLOPs", fmt_sci(last.get("flops"))],
            ["throughput (mean of logged intervals)", "—" if not tok_s else f"{sum(tok_s) / len(tok_s):,.0f} tok/s"],
            ["MFU (mean of logged intervals)", "—" if not mfus else f"{100 * sum(mfus) / len(mfus):.3g}% of {fmt_sci(m.get('peak_flops'))} FLOP/s"]]
    versions = dict(m.get("versions") or {})
    if m.get("growlm_version"):
        versions = {"growlm": m["growlm_version"], **versions}
    out = ["## Resources", "", _table(["resource", "value"], rows), "", "## Framework versions", ""]
    out += [f"- {k} {v}" for k, v in versions.items()] or ["Unknown (the run predates kind=run lines)."]
    return "\n".join(out)


def config_section(run: RunData) -> str:
    if not run.config:
        return "## Training configuration\n\nNot recorded."
    return "## Training configuration\n\n```yaml\n" + yaml.safe_dump(run.config, sort_keys=False).rstrip() + "\n```"


def usage_snippet(run: RunData, path: str) -> str | None:
    """Python that loads the exported directory with transformers and generates (None without an export)."""
    hf = run.hf_dir
    if hf is None:
        return None
    prompt = "To be, or not to be" if dataset_name(run) == "shakespeare" else "The"
    has_tok = any((hf / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    head = ["from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if has_tok else ""),
            *([] if has_tok else ["import torch"]), "",
            f'path = "{path}"  # the exported model (relative to this card), or its hub id once uploaded',
            "model = AutoModelForCausalLM.from_pretrained(path)"]
    if has_tok:
        body = ["tokenizer = AutoTokenizer.from_pretrained(path)",
                f'inputs = tokenizer("{prompt}", return_tensors="pt")',
                "out = model.generate(**inputs, max_new_tokens=32, do_sample=False)",
                "print(tokenizer.decode(out[0], skip_special_tokens=True))"]
    elif run.value("model.tokenizer") == "bytes":
        body = [f'ids = torch.tensor([list("{prompt}".encode("utf-8"))])  # growlm byte tokenizer: id = byte, 256 = EOS',
                "out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False, pad_token_id=256)",
                'print(bytes(t for t in out[0].tolist() if t < 256).decode("utf-8", errors="replace"))']
    else:
        body = ["ids = torch.tensor([[0]])  # no tokenizer was saved with this model: token ids in, token ids out",
                "out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)",
                "print(out[0].tolist())"]
    return "\n".join(head + body)


# -- the card ------------------------------------------------------------------------------------------------
def card_data(run: RunData) -> ModelCardData:
    base, lic = base_model(run)
    family = "llama" if "llama" in str(run.value("model.name", "")) or run.value("model.name") == "smollm2-135m" else None
    tags = ["growlm", "text-generation"]
    tags += ["model-growth"] if run.growth else []
    if not run.value("distill.teacher"):
        tags += ["continued-pretraining"] if run.value("model.init") == "pretrained" else ["from-scratch"]
    tags += ["knowledge-distillation"] if (run.value("reg.kd_weight") or 0) > 0 or run.value("distill.teacher") else []
    tags += ["pruning"] if ((run.distill or {}).get("student") or {}).get("kept_layers") is not None else []
    tags += [family] if family else []
    return ModelCardData(library_name="transformers", base_model=base, base_model_relation="finetune" if base else None,
                         datasets=[dataset_name(run)], license=lic, tags=tags, pipeline_tag="text-generation",
                         model_name=run.name, eval_results=eval_results(run) or None)


def card_text(run: RunData, plot_files: dict[str, str], hf_path: str | None) -> str:
    """The card as Markdown: front matter, then the sections; `plot_files` maps stem -> path relative to the card."""
    sections = [f"# {run.name}", "", summary_sentence(run)]
    if run.missing:
        sections += ["", "> **Incomplete run directory**; this report leaves out what it cannot read:", ">"]
        sections += [f"> - {m}" for m in run.missing]
    sections += ["", architecture_section(run), "", growth_section(run), "", metrics_section(run)]
    if run.distill:
        sections += ["", teacher_section(run)]
    if plot_files:
        sections += ["", "## Curves", ""] + [f"![{k}]({v})" for k, v in plot_files.items()]
    sections += ["", config_section(run), "", resources_section(run)]
    snippet = usage_snippet(run, hf_path) if hf_path is not None else None
    sections += ["", "## Usage", ""]
    sections += ["```python", snippet, "```"] if snippet else ["No exported model in this run directory (`hf/` is absent)."]
    sections += ["", f"Generated by `growlm report` from `{run.name}/metrics.jsonl`."]
    return f"---\n{card_data(run).to_yaml()}\n---\n\n" + "\n".join(sections) + "\n"


def write_card(run: RunData, out_dir: Path | None = None) -> list[Path]:
    """Write README.md and the plots into `out_dir` (default: the run directory, and a copy in its hf/ so
    the card travels with the model). Returns the card paths written."""
    targets = [Path(out_dir)] if out_dir is not None else [run.path] + ([run.hf_dir] if run.hf_dir else [])
    figs = plots.run_figures(run)
    first = targets[0]
    files = {k: plots.save(f, first / PLOT_DIR / f"{k}.png") for k, f in figs.items()}
    written = []
    for t in targets:
        t.mkdir(parents=True, exist_ok=True)
        if t != first:
            for p in files.values():
                (t / PLOT_DIR).mkdir(exist_ok=True)
                shutil.copyfile(p, t / PLOT_DIR / p.name)
        rel = {k: f"{PLOT_DIR}/{p.name}" for k, p in files.items()}
        hf_path = None if run.hf_dir is None else os.path.relpath(run.hf_dir, t)
        text = card_text(run, rel, hf_path)
        ModelCard(text)  # parses the front matter: a card huggingface_hub cannot read is a bug here
        atomic_write(t / "README.md", text)
        written.append(t / "README.md")
    return written
