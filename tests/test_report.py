"""Run reports (`growlm report`): the card's numbers, model-index and usage snippet, the plots' data,
comparisons, incomplete run directories, and output to another folder. One tiny CLI training (BPE
tokenizer, grown twice) and one smaller, shorter run without growth are shared by the module."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from growlm.cli import main
from growlm.models.tokenizer import train_bpe
from growlm.report import load_run, write_card
from growlm.report.card import fmt_int, fmt_loss, fmt_ppl, fmt_sci
from growlm.report.compare import compare_rows
from growlm.report.plots import compare_figure, growth_marks, loss_figure, lr_figure, params_figure, series

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them.\n")


def _train(tmp: Path, name: str, *extra: str) -> Path:
    out = tmp / name
    argv = ["train", "--model.name", "tiny-llama", "--model.init", "scratch", "--model.tokenizer", str(tmp / "tok"),
            "--model.overrides", "{vocab_size: 300, n_layer: 1, n_embd: 16, n_head: 2, n_kv_head: 1, ffn_size: 32}",
            "--data.path", str(tmp / "corpus.txt"), "--data.seq_len", "16", "--data.val_blocks", "4",
            "--data.cache_dir", str(tmp / "cache"), "--run.micro_batch", "4", "--run.eval_every", "2",
            "--run.log_every", "1", "--run.peak_flops", "1e12", "--run.save_every", "0", "--run.export_hf", "true",
            "--run.retention_blocks", "2", "--run.out_dir", str(out), *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "corpus.txt").write_text(TEXT * 40)
    train_bpe([str(tmp / "corpus.txt")], 300, tmp / "tok")
    grown = _train(tmp, "grown", "--run.max_steps", "6", "--growth.trigger", "steps", "--growth.steps", "[2, 4]",
                   "--growth.operators", "[{operator: depth, n: 1}, {operator: width, factor: 2}]")
    small = _train(tmp, "small", "--run.max_steps", "4")
    return grown, small


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rows(card: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with `| first_header |`."""
    lines = card.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_train_writes_the_card_and_its_snippet_generates(runs, monkeypatch, capsys):
    grown = runs[0]
    for folder in (grown, grown / "hf"):  # the card travels with the exported model
        card = (folder / "README.md").read_text()
        assert (folder / "report" / "loss.png").is_file()
        monkeypatch.chdir(folder)
        capsys.readouterr()
        snippet = _snippet(card)
        prompt = re.search(r'tokenizer\("([^"]+)"', snippet).group(1)
        exec(compile(snippet, str(folder / "README.md"), "exec"), {})  # as written, from the card's folder
        generated = capsys.readouterr().out
        assert generated.startswith(prompt) and len(generated.strip()) > len(prompt)  # 32 new tokens


def test_every_number_in_the_card_is_the_logged_one(runs):
    grown = runs[0]
    card = (grown / "README.md").read_text()
    recs = _metrics(grown)
    train = [r for r in recs if r["kind"] == "train"]
    events = [r for r in recs if r["kind"] == "growth"]
    evald = [r for r in train if r.get("val_loss") is not None]
    assert len(events) == 2
    rows = _rows(card, "event")
    assert len(rows) == len(events)
    for row, e in zip(rows, events):
        assert row[:3] == [str(e["event"]), str(e["step"]), e["operator"]]
        assert row[4] == f"{e['before']['n_layer']} -> {e['after']['n_layer']}"
        assert row[6] == f"{fmt_int(e['params_before'])} -> {fmt_int(e['params_after'])}"
        assert row[7:11] == [fmt_int(e["params_added"]), fmt_int(e["trainable_params"]), fmt_loss(e["val_loss_before"]),
                             fmt_loss(e["val_loss_after"])]
    summary = {r[0]: r for r in _rows(card, "evaluation")}
    best = min(evald[1:], key=lambda r: r["val_loss"])
    for label, r in (("initial", evald[0]), ("final", evald[-1]), ("best", best)):
        assert summary[label][1:4] == [str(r["step"]), fmt_loss(r["val_loss"]), fmt_ppl(r["val_ppl"])]
    res = {r[0]: r[1:] for r in _rows(card, "measure")}
    assert res["validation perplexity"] == [fmt_ppl(evald[0]["val_ppl"]), fmt_ppl(evald[-1]["val_ppl"])]
    assert f"| tokens | {fmt_int(train[-1]['tokens'])} |" in card
    assert f"| executed FLOPs | {fmt_sci(train[-1]['flops'])} |" in card
    start = next(r for r in recs if r["kind"] == "run" and r["event"] == "start")
    end = next(r for r in recs if r["kind"] == "run" and r["event"] == "end")
    assert f"{end['wall_s']:.1f} s" in card and start["cpu"] in card and start["versions"]["torch"] in card
    assert f"| end | {fmt_int(train[-1]['params'])} | {fmt_int(train[-1]['trainable_params'])} |" in card


def test_model_index_parses_into_the_evaluated_metrics(runs, tmp_path):
    grown = runs[0]
    d = tmp_path / "task" / "piqa"
    d.mkdir(parents=True)
    items = [{"goal": "to be", "sol1": "or not to be", "sol2": "the question", "label": i % 2} for i in range(3)]
    (d / "validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    run_dir = tmp_path / "run"
    shutil.copytree(grown, run_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(run_dir), "--eval", "piqa", "--data-dir", str(tmp_path / "task"), "--limit", "2"]) == 0
    scores = json.loads((run_dir / "eval_results.json").read_text())["results"]["piqa"]
    recs = _metrics(run_dir)
    final = [r for r in recs if r["kind"] == "train" and r.get("val_loss") is not None][-1]
    retention = next(r for r in recs if r["kind"] == "retention")
    card = ModelCard.load(run_dir / "README.md")  # no validate(): it needs the hub
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("corpus.txt", "perplexity"): final["val_ppl"],
                   ("corpus.txt", "loss"): final["val_loss"],
                   ("pydoc_data.topics", "perplexity"): math.exp(retention["retention_loss_final"]),
                   ("piqa", "acc"): scores["acc"], ("piqa", "acc_norm"): scores["acc_norm"]}
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "model-growth" in card.data.tags and scores["n"] == 2


def test_plots_mark_every_growth_event(runs):
    run = load_run(runs[0])
    want = [f"growth-{e['event']}" for e in run.growth]
    assert len(want) == 2
    assert growth_marks(loss_figure(run)) == [want, want]  # against steps and against executed FLOPs
    assert growth_marks(params_figure(run)) == [want]
    assert growth_marks(lr_figure(run)) == [want]
    s, train = series(run), [r for r in run.train if r.get("loss") is not None]
    line = next(ln for ln in loss_figure(run).axes[1].get_lines() if ln.get_gid() == "train")
    assert list(line.get_xdata()) == [r["flops"] for r in train] == s["train_loss_flops"][0]
    assert list(line.get_ydata()) == [r["loss"] for r in train]
    params = dict(zip(*s["params_step"]))
    assert [params[e["step"]] for e in run.growth] == [e["params_after"] for e in run.growth]
    assert growth_marks(loss_figure(load_run(runs[1]))) == [[], []]


def test_comparison_of_runs_of_different_sizes_and_lengths(runs, tmp_path):
    grown, small = runs
    out = tmp_path / "cmp"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(grown), str(small), "--out", str(out)]) == 0
    page = (out / "README.md").read_text()
    assert (out / "compare_loss.png").is_file()
    a, b = load_run(grown), load_run(small)
    assert a.last["params"] != b.last["params"] and a.last["step"] != b.last["step"]
    rows = _rows(page, "run")
    assert rows == compare_rows([a, b])
    assert rows[0][:3] == ["grown", "6", fmt_int(a.last["params"])] and rows[1][:3] == ["small", "4", fmt_int(b.last["params"])]
    fig = compare_figure([a, b])
    for ax, key in zip(fig.axes, ("train", "val")):
        lines = {ln.get_gid(): ln for ln in ax.get_lines()}
        assert list(lines[f"{key}:small"].get_xdata()) == series(b)[f"{key}_loss_flops"][0]
        assert len([g for g in lines if str(g).startswith("growth-")]) == len(a.growth)


def test_report_to_another_folder(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "docs" / "main-job"
    before = (runs[0] / "README.md").read_text()
    assert main(["report", str(runs[0]), "--out", str(out)]) == 0
    assert (out / "README.md").is_file() and (out / "report" / "loss.png").is_file()
    assert (runs[0] / "README.md").read_text() == before  # the run directory is left alone
    monkeypatch.chdir(out)
    capsys.readouterr()
    exec(compile(_snippet((out / "README.md").read_text()), "card", "exec"), {})
    assert capsys.readouterr().out.startswith("The")


def test_incomplete_run_still_reports_and_a_non_run_exits_2(runs, tmp_path, capsys):
    d = tmp_path / "killed"
    shutil.copytree(runs[0], d)
    shutil.rmtree(d / "hf")
    (d / "README.md").unlink()
    text = (d / "metrics.jsonl").read_text()
    lines = text.splitlines()
    cut = "\n".join(lines[:-3]) + "\n" + lines[-3][: len(lines[-3]) // 2]  # killed mid-write, before the end lines
    (d / "metrics.jsonl").write_text(cut)
    capsys.readouterr()
    assert main(["report", str(d)]) == 0
    out = capsys.readouterr().out
    card = (d / "README.md").read_text()
    for needle in ("truncated", "no exported model", "did not finish"):
        assert needle in out and needle in card
    ModelCard.load(d / "README.md")
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "absent"):
        assert main(["report", str(bad)]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and "not a run directory" in err[0], err


def test_a_killed_and_resumed_run_reports_both_segments(tmp_path):
    from growlm.models.model import GPT
    from growlm.train import Trainer
    from tests.conftest import tiny_config
    from tests.test_train import config, packed

    cfg = config(tmp_path, "r", run=dict(max_steps=4, save_every=1))
    Trainer(cfg, GPT(tiny_config("llama")), packed()).fit(stop_after=2)
    killed = load_run(tmp_path / "r")
    assert len(killed.starts) == 1 and not killed.ends and any("did not finish" in m for m in killed.missing)
    resumed = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))
    Trainer(resumed, GPT(tiny_config("llama")), packed()).fit()
    run = load_run(tmp_path / "r")
    assert [s["step"] for s in run.starts] == [0, 2] and [e["step"] for e in run.ends] == [4]
    assert [r["step"] for r in run.train] == [0, 1, 2, 3, 4] and not any("did not finish" in m for m in run.missing)
    assert run.config["run"]["max_steps"] == 4 and run.machine["cpu_count"] >= 1

    # the wall time counts both processes: the killed one to its last kept line's elapsed_s, the resumed one to its end
    recs = _metrics(tmp_path / "r")
    second = next(i for i, r in enumerate(recs) if r["kind"] == "run" and r["event"] == "start" and r["step"] == 2)
    killed_s = [r["elapsed_s"] for r in recs[:second] if r["kind"] == "train" and "elapsed_s" in r][-1]
    resumed_s = next(r["wall_s"] for r in recs if r["kind"] == "run" and r["event"] == "end")
    assert killed_s > 0 and [(g.start_step, g.last_step, g.finished) for g in run.segments] == [(0, 2, False), (2, 4, True)]
    assert run.wall_s == pytest.approx(killed_s + resumed_s) and run.wall_s > resumed_s
    write_card(run)
    row = _rows((tmp_path / "r" / "README.md").read_text(), "resource")[0]
    assert row[0] == "wall time (training, 2 segments)"
    assert row[1] == f"{killed_s + resumed_s:.1f} s (segment 1 (steps 0-2) was interrupted; counted to its last logged step)"
    assert compare_rows([run, run])[0][-1] == f"{killed_s + resumed_s:.1f}"
