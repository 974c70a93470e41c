"""Progress a person can follow: under a terminal `growlm train` and `growlm eval` show rich bars (with rate
and ETA); without one (CI, a file) they write plain log lines with elapsed time and ETA, and no bar or carriage
return. The evaluation code reports progress(done, total) per batch, done reaching total."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from growlm.cli.progress import ProgressDisplay
from growlm.eval import evaluate, generate_until, perplexity, rolling_windows, tok_encode
from growlm.eval.scoring import evaluate_loglikelihood_tasks
from growlm.eval.tasks import TASKS
from growlm.models.hf import save_hf
from growlm.models.model import GPT
from growlm.models.tokenizer import train_bpe
from tests.conftest import tiny_config

BAR = "━"  # rich's bar glyph (tables in plain output are ASCII)


@pytest.fixture(scope="module")
def argv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress")
    (tmp / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    return [sys.executable, "-m", "growlm.cli", "train", "--model.name", "tiny-llama", "--model.init", "scratch",
            "--model.tokenizer", "bytes", "--model.overrides", "{vocab_size: 257, n_layer: 1, n_embd: 16, n_head: 2, n_kv_head: 1, ffn_size: 32}",
            "--data.path", str(tmp / "corpus.txt"), "--data.seq_len", "16", "--data.val_blocks", "4",
            "--data.cache_dir", str(tmp / "cache"), "--run.max_steps", "40", "--run.micro_batch", "2",
            "--run.eval_every", "20", "--run.log_every", "10", "--run.peak_flops", "1e12", "--run.save_every", "0",
            "--run.export_hf", "false"], tmp


def _env():
    return {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "PYTHONPATH": os.pathsep.join(sys.path)}


def _run_in_terminal(cmd: list[str]) -> str:
    """Run cmd with a pseudo-terminal as stdin, stdout and stderr; its output (exit code 0 asserted)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=_env(), close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + 240
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 1.0)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def _plain(text: str) -> str:
    """Terminal output without its escape sequences (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_a_terminal_sees_the_progress_bar(argv):
    cmd, tmp = argv
    text = _run_in_terminal([*cmd, "--run.out_dir", str(tmp / "tty")])
    assert re.search(r"train +[━╸╺]+ +\d+/40 .*eta", _plain(text)), text[-2000:]  # the bar, not a table's rule
    assert "tok/s" in text and "step 00040/00040" in text


def test_without_a_terminal_the_log_is_plain(argv):
    cmd, tmp = argv
    r = subprocess.run([*cmd, "--run.out_dir", str(tmp / "plain")], capture_output=True, text=True, env=_env(), timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert BAR not in out and "\r" not in out and "\x1b" not in out, out[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 00000/00040", "step 00010/00040", "step 00020/00040",
                                                    "step 00030/00040", "step 00040/00040"]
    assert all("elapsed " in ln for ln in lines) and all("| eta " in ln for ln in lines[2:]), lines


# -- evaluation: `growlm eval` and the progress(done, total) callbacks of growlm.eval ---------------------------
def _piqa(n: int) -> str:
    return "".join(json.dumps({"goal": f"How do I open jar number {i}?", "sol1": "Twist the lid to the left.",
                               "sol2": f"Hit it {i} times with a hammer.", "label": i % 2}) + "\n" for i in range(n))


def _wiki(n: int) -> str:
    return "".join(json.dumps({"page": f" = Page {i} = \n\n" + "The question is whether to be or not to be . " * (5 + 3 * i)})
                   + "\n" for i in range(n))


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """A tiny Llama saved with a BPE tokenizer, and piqa/wikitext files in the --data_dir layout."""
    tmp = tmp_path_factory.mktemp("eval-progress")
    tok = train_bpe(["To be, or not to be, that is the question. How do I open a jar? Twist the lid.\n" * 50], 300,
                    tmp / "tok")
    torch.manual_seed(0)
    model = GPT(tiny_config("llama", vocab_size=len(tok), block_size=64)).eval()
    d = save_hf(model, tmp / "model", tok)
    (tmp / "tasks" / "piqa").mkdir(parents=True)
    (tmp / "tasks" / "piqa" / "valid.jsonl").write_text(_piqa(30))
    (tmp / "tasks" / "wikitext2").mkdir(parents=True)
    (tmp / "tasks" / "wikitext2" / "test.jsonl").write_text(_wiki(6))
    return model, tok, d, tmp / "tasks"


def _eval_argv(eval_setup) -> list[str]:
    _, _, d, tasks = eval_setup
    return [sys.executable, "-m", "growlm.cli", "eval", "--model", str(d), "--tasks", "piqa,wikitext",
            "--data_dir", str(tasks), "--batch_size", "1"]


def test_eval_under_a_terminal_shows_a_bar(eval_setup):
    text = _run_in_terminal(_eval_argv(eval_setup))
    assert re.search(r"piqa +[━╸╺]+ +\d+/60 .*eta", _plain(text)), text[-2000:]
    assert re.search(r"wikitext +[━╸╺]+ +\d+/\d+ .*eta", _plain(text)), text[-2000:]
    assert "word_perplexity" in text and "acc_norm" in text  # the results table after the bars


def test_eval_without_a_terminal_logs_plain_lines(eval_setup):
    r = subprocess.run(_eval_argv(eval_setup), capture_output=True, text=True, env=_env(), timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert BAR not in out and "\r" not in out and "\x1b" not in out, out[-2000:]
    lines = r.stdout.splitlines()
    assert any(re.fullmatch(r"piqa \| 60/60 requests \| [\d,.]+ requests/s \| elapsed \d+s \| eta 0s", ln) for ln in lines), lines
    assert any(re.fullmatch(r"wikitext \| (\d+)/\1 windows \| .*elapsed \d+s \| eta 0s", ln) for ln in lines), lines


def _calls():
    calls: list[tuple[int, int]] = []
    return calls, lambda done, total: calls.append((done, total))


def _counts_to(calls: list[tuple[int, int]], total: int, batches: int) -> None:
    """(0, total) first, then one call per batch, done rising to total."""
    assert calls[0] == (0, total) and calls[-1] == (total, total), calls
    assert all(t == total for _, t in calls) and all(a[0] <= b[0] for a, b in zip(calls, calls[1:])), calls
    assert len(calls) == batches + 1, calls


@pytest.mark.parametrize("share", ["packed", "cache", "none", "prefix"])
def test_loglikelihood_task_progress_reaches_its_total(eval_setup, share):
    model, tok, _, tasks = eval_setup
    calls, on = _calls()
    evaluate_loglikelihood_tasks(model, tok, "piqa", str(tasks), limit=7, batch_size=4, share_context=share, progress=on)
    assert calls[-1] == (14, 14)  # 7 questions x 2 choices
    batches = {"packed": 4, "cache": 7, "none": 4, "prefix": 4}[share]  # packed: 2 questions (4 choices) a row batch
    _counts_to(calls, 14, batches)


def test_perplexity_progress_counts_rolling_windows(eval_setup):
    model, tok, _, tasks = eval_setup
    pages = [json.loads(ln)["page"] for ln in _wiki(6).splitlines()]
    windows = sum(len(rolling_windows(tok_encode(tok, p), tok.eos_token_id, 64)) for p in pages)
    assert windows > 6  # some pages need more than one window of 32 tokens
    calls, on = _calls()
    perplexity(model, tok, pages, batch_size=5, progress=on)
    _counts_to(calls, windows, -(-windows // 5))
    calls, on = _calls()  # the wikitext task (pages detokenised first) and then piqa: each counts from 0
    evaluate(model, tok, "wikitext,piqa", str(tasks), limit=6, batch_size=5, progress=on)
    split = next(i for i, c in enumerate(calls) if c[0] == c[1])
    assert calls[split + 1] == (0, 12) and calls[-1] == (12, 12), calls
    assert calls[split][1] == len([w for p in TASKS["wikitext"].load(tasks / "wikitext2" / "test.jsonl")
                                   for w in rolling_windows(tok_encode(tok, TASKS["wikitext"].doc_to_target(p)), tok.eos_token_id, 64)])


def test_generation_progress_counts_prompts(eval_setup):
    model, tok, _, _ = eval_setup
    calls, on = _calls()
    generate_until(model, tok, ["To be", "How do I", "Twist", "or not", "the"], ["\n"], max_gen_toks=4, batch_size=2,
                   progress=on)
    _counts_to(calls, 5, 3)


def test_plain_lines_come_every_interval_with_elapsed_and_eta():
    out = io.StringIO()
    now = [100.0]
    display = ProgressDisplay(Console(file=out, width=150), every_s=10.0, clock=lambda: now[0])
    assert not display.live and display.plain
    on = display.parts([("piqa", "requests"), ("wikitext", "windows")])
    for t, done, total in [(0, 0, 40), (5, 4, 40), (20, 10, 40), (25, 20, 40), (31, 30, 40), (32, 40, 40), (33, 0, 3), (36, 3, 3)]:
        now[0] = 100.0 + t
        on(done, total)
    assert out.getvalue().splitlines() == [
        "piqa | 0/40 requests | elapsed 0s",  # the start: what runs and how much of it
        "piqa | 10/40 requests | 0.5 requests/s | elapsed 20s | eta 1m00s",  # >= 10 s after the last line; eta = elapsed / done x left
        "piqa | 30/40 requests | 1.0 requests/s | elapsed 31s | eta 10s",
        "piqa | 40/40 requests | 1.2 requests/s | elapsed 32s | eta 0s",  # the end of the task
        "wikitext | 0/3 windows | elapsed 0s",  # the next task: its own clock
        "wikitext | 3/3 windows | 1.0 windows/s | elapsed 3s | eta 0s",
    ]
