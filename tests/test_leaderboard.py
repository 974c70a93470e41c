"""MMLU, TruthfulQA MC1/MC2, GSM8K and few-shot ARC/HellaSwag/WinoGrande equal lm-evaluation-harness 0.4.13.

The reference is the harness's own task pipeline (its YAMLs, samplers, filters and metrics) on local json
files holding the same items, and its HFLM backend on a Hugging Face export of the same tiny growlm model
(block 4096, so that 25-shot prompts fit). One harness run per model family serves every parity test.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_data, tiny_config
from tests.test_eval import hflm, tok  # noqa: F401 - the tokenizer fixture
from growlm.errors import GrowlmError
from growlm.eval import benchmarks as B
from growlm.eval import evaluate, evaluate_suite, generate_until
from growlm.eval.leaderboard import gsm8k_contexts
from growlm.eval.tasks import TASKS
from growlm.models.model import GPT

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

SUBJECTS = ("abstract_algebra", "high_school_physics")
N = 3  # evaluated items per task (the harness's --limit)
FEWSHOT = {"arc_challenge": (25, "arc/arc_challenge.yaml", 30), "hellaswag": (10, "hellaswag/hellaswag.yaml", 14),
           "winogrande": (5, "winogrande/default.yaml", 8)}  # shots, harness YAML, items in the file


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_mmlu_csv(path: Path, docs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([d["question"], *d["choices"], "ABCD"[d["answer"]]] for d in docs)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A --data-dir with the first items of each task (MMLU as CSV, the rest in the original formats)."""
    src = shared_data()
    root = tmp_path_factory.mktemp("lb")
    for s in SUBJECTS:
        write_mmlu_csv(root / "mmlu" / "test" / f"{s}_test.csv",
                       B.read_mmlu_csv(src / "mmlu" / "test" / f"{s}_test.csv")[:N + 1])
        write_mmlu_csv(root / "mmlu" / "dev" / f"{s}_dev.csv", B.read_mmlu_csv(src / "mmlu" / "dev" / f"{s}_dev.csv"))
    tqa = json.loads((src / "truthfulqa" / "mc_task.json").read_text())[:N + 1]
    (root / "truthfulqa").mkdir()
    (root / "truthfulqa" / "mc_task.json").write_text(json.dumps(tqa))
    for split, n in (("test", N + 1), ("train", 20)):
        write_jsonl(root / "gsm8k" / f"{split}.jsonl", B.read_gsm8k(src / "gsm8k" / f"{split}.jsonl")[:n])
    for name, (_, _, n) in FEWSHOT.items():
        t = TASKS[name]
        write_jsonl(root / t.folder / f"test_{name}.jsonl", t.load(t.find_file(src))[:n])
    return root


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lpair(request, tok, tmp_path_factory):  # noqa: F811
    from growlm.models.hf import save_hf

    torch.manual_seed(2)
    cfg = tiny_config(request.param, vocab_size=len(tok), block_size=4096, bos_token_id=0, eos_token_id=0)
    model = GPT(cfg).eval()
    return model, save_hf(model, tmp_path_factory.mktemp(f"hf-{request.param}"), tok)


def harness_yamls(files: Path, ydir: Path) -> list[str]:
    """Local copies of the harness's task YAMLs: its prompts, samplers and metrics on our files."""
    root = Path(lm_eval.__file__).parent / "tasks"
    ydir.mkdir(exist_ok=True)
    tasks = {}
    for s in SUBJECTS:
        test = write_jsonl(ydir / f"{s}_test.jsonl", [{**d, "subject": s} for d in
                                                       B.read_mmlu_csv(files / "mmlu" / "test" / f"{s}_test.csv")])
        dev = write_jsonl(ydir / f"{s}_dev.jsonl", [{**d, "subject": s} for d in
                                                     B.read_mmlu_csv(files / "mmlu" / "dev" / f"{s}_dev.csv")])
        tasks[f"mmlu_{s}"] = (f"mmlu/default/mmlu_{s}.yaml", f"    test: {test}\n    dev: {dev}\n",
                              "test_split: test\nfewshot_split: dev\nnum_fewshot: 5\ntag: []\n")
    tqa = write_jsonl(ydir / "tqa.jsonl", B.read_truthfulqa(files / "truthfulqa" / "mc_task.json"))
    for which in ("truthfulqa_mc1", "truthfulqa_mc2"):
        tasks[which] = (f"truthfulqa/{which}.yaml", f"    validation: {tqa}\n", "tag: []\n")
    tasks["gsm8k"] = ("gsm8k/gsm8k.yaml", f"    train: {files / 'gsm8k' / 'train.jsonl'}\n"
                                          f"    test: {files / 'gsm8k' / 'test.jsonl'}\n", "tag: []\n")
    for name, (shots, y, _) in FEWSHOT.items():
        f = files / TASKS[name].folder / f"test_{name}.jsonl"
        tasks[name] = (y, f"    test: {f}\n", f"training_split: null\nvalidation_split: null\ntest_split: test\n"
                                              f"fewshot_split: test\nnum_fewshot: {shots}\n")
    for name, (y, data, extra) in tasks.items():
        (ydir / f"{name}.yaml").write_text(
            f"include: {root / y}\ntask: {name}_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{data}{extra}")
    return list(tasks)


@pytest.fixture(scope="module")
def harness(lpair, files, tmp_path_factory):
    """The harness's samples per task, sorted by document."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ydir = tmp_path_factory.mktemp("yaml")
    names = harness_yamls(files, ydir)
    out = simple_evaluate(model=hflm(lpair[1]), tasks=[f"{n}_local" for n in names], limit=N,
                          task_manager=TaskManager(include_path=str(ydir), include_defaults=False),
                          log_samples=True, bootstrap_iters=0)
    return {n: sorted(out["samples"][f"{n}_local"], key=lambda s: s["doc_id"]) for n in names}, out["results"]


def _lls(h) -> list[float]:
    return [r[0][0] for r in h["resps"]]


def test_mmlu_matches_harness(lpair, tok, files, harness):  # noqa: F811
    model, _ = lpair
    samples, results = harness
    for s in SUBJECTS:
        ours = evaluate(model, tok, f"mmlu_{s}", str(files), limit=N, num_fewshot=5, batch_size=2)
        hs = samples[f"mmlu_{s}"]
        assert len(ours["samples"][f"mmlu_{s}"]) == len(hs) == N
        for o, h in zip(ours["samples"][f"mmlu_{s}"], hs):
            assert h["arguments"][0][0].startswith(B.mmlu_description(s)) and h["arguments"][0][0].count("\n\n") == 6
            torch.testing.assert_close(o["loglikelihoods"], _lls(h), atol=1e-5, rtol=1e-6)
            assert o["acc"] == h["acc"]
        assert ours["results"][f"mmlu_{s}"]["acc"] == pytest.approx(results[f"mmlu_{s}_local"]["acc,none"])


def test_truthfulqa_matches_harness(lpair, tok, files, harness):  # noqa: F811
    model, _ = lpair
    samples, results = harness
    for which in ("truthfulqa_mc1", "truthfulqa_mc2"):
        ours = evaluate(model, tok, which, str(files), limit=N, batch_size=3)
        for o, h in zip(ours["samples"][which], samples[which], strict=True):
            torch.testing.assert_close(o["loglikelihoods"], _lls(h), atol=1e-5, rtol=1e-6)
            assert o["acc"] == pytest.approx(h["acc"], abs=1e-5)
        assert ours["results"][which]["acc"] == pytest.approx(results[f"{which}_local"]["acc,none"], abs=1e-5)
        assert ours["results"][which]["n"] == N


def test_gsm8k_generation_matches_harness(lpair, tok, files, harness):  # noqa: F811
    model, _ = lpair
    samples, results = harness
    hs = samples["gsm8k"]  # one sample per document and filter
    ours = evaluate(model, tok, "gsm8k", str(files), limit=N, num_fewshot=5, batch_size=2)
    docs = B.read_gsm8k(files / "gsm8k" / "test.jsonl")[:N]
    contexts = gsm8k_contexts(docs, B.read_gsm8k(files / "gsm8k" / "train.jsonl"), 5, 1234)
    for i, o in enumerate(ours["samples"]["gsm8k"]):
        mine = [h for h in hs if h["doc_id"] == i]
        assert {h["filter"] for h in mine} == {"strict-match", "flexible-extract"}
        for h in mine:
            assert h["arguments"][0][0] == contexts[i]  # the same seeded few-shot examples
            assert h["resps"][0][0] == o["generation"]  # the same greedy string
            assert h["filtered_resps"][0] == o["answers"][h["filter"]]
            assert h["exact_match"] == o[h["filter"]]
    for f in ("strict-match", "flexible-extract"):
        assert ours["results"]["gsm8k"][f] == pytest.approx(results["gsm8k_local"][f"exact_match,{f}"])


def test_fewshot_tasks_match_harness(lpair, tok, files, harness):  # noqa: F811
    model, _ = lpair
    samples, _ = harness
    for name, (shots, _, _) in FEWSHOT.items():
        f = files / TASKS[name].folder / f"test_{name}.jsonl"
        ours = evaluate(model, tok, name, str(f), limit=N, num_fewshot=shots, batch_size=4)["samples"][name]
        for o, h in zip(ours, samples[name], strict=True):
            assert h["arguments"][0][0].count("\n\n") >= shots
            torch.testing.assert_close(o["loglikelihoods"], _lls(h), atol=1e-5, rtol=1e-6, msg=lambda m: f"{name}: {m}")
            assert o["acc"] == h["acc"]


# -- generation --------------------------------------------------------------------------------------
def test_batched_generation_equals_one_at_a_time(tok):  # noqa: F811
    torch.manual_seed(0)
    model = GPT(tiny_config("llama", vocab_size=len(tok), block_size=256, eos_token_id=0)).eval()
    prompts = ["Question: what is two and two?\nAnswer:", "To be", "ROMEO: Wherefore art thou", "Question:"]
    batched = generate_until(model, tok, prompts, ["\n\n", "Question:"], max_gen_toks=24, batch_size=4)
    alone = [generate_until(model, tok, [p], ["\n\n", "Question:"], max_gen_toks=24, batch_size=1)[0]
             for p in prompts]
    assert batched == alone
    assert all("Question:" not in g and "\n\n" not in g for g in batched)


# -- the suite and malformed files --------------------------------------------------------------------
def test_suite_row_and_subset(lpair, tok, files):  # noqa: F811
    model, _ = lpair
    out = evaluate_suite(model, tok, str(files), tasks="truthfulqa_mc2,gsm8k", limit=2)
    assert list(out["row"]) == ["truthfulqa_mc2", "gsm8k"]
    assert out["row"]["gsm8k"]["num_fewshot"] == 5 and out["row"]["gsm8k"]["n"] == 2
    assert out["average"] == pytest.approx(sum(r["value"] for r in out["row"].values()) / 2)
    assert out["seed_card"] == {"truthfulqa_mc2": 40.71, "gsm8k": 0.3}
    with pytest.raises(GrowlmError, match="not in the leaderboard suite"):
        evaluate_suite(model, tok, str(files), tasks="piqa")


def test_malformed_rows_and_missing_files_name_file_and_line(tmp_path, lpair, tok):  # noqa: F811
    model, _ = lpair
    bad = tmp_path / "mmlu" / "test" / "anatomy_test.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text('q1,a,b,c,d,A\n"multi\nline",a,b,c,d,B\nq3,a,b,c,E\n')
    with pytest.raises(GrowlmError) as e:
        B.read_mmlu_csv(bad)
    assert str(e.value) == f"{bad}:4: expected 6 fields (question, A, B, C, D, answer), got 5"
    bad.write_text("q1,a,b,c,d,A\nq2,a,b,c,d,F\n")
    with pytest.raises(GrowlmError, match=f"^{bad}:2: answer 'F' is not one of A, B, C, D$"):
        B.read_mmlu_csv(bad)
    with pytest.raises(GrowlmError, match=r"abstract_algebra_test\.csv: missing MMLU subject file$"):
        evaluate(model, tok, "mmlu", str(tmp_path), num_fewshot=0)
    g = tmp_path / "gsm8k" / "test.jsonl"
    write_jsonl(g, [{"question": "q", "answer": "x\n#### 3"}, {"question": "q", "answer": "no final line"}])
    with pytest.raises(GrowlmError, match=f"^{g}:2: answer has no '#### <number>' final line$"):
        B.read_gsm8k(g)
    t = tmp_path / "truthfulqa" / "mc_task.json"
    t.parent.mkdir()
    t.write_text(json.dumps([{"question": "q", "mc1_targets": {"a": 0, "b": 1}, "mc2_targets": {"a": 1}}]))
    with pytest.raises(GrowlmError, match=f"^{t}:item 1: mc1_targets needs exactly one true answer, listed first$"):
        B.read_truthfulqa(t)


def test_gsm8k_answer_rules():
    text = "She pays 3 * $4 = $12.\n#### 12\n\nQuestion: next"
    assert B.gsm8k_extract(text) == {"strict-match": "12", "flexible-extract": "12"}
    assert B.gsm8k_extract("about -1,000.5 dollars") == {"strict-match": "[invalid]", "flexible-extract": "-1,000.5"}
    assert B.gsm8k_exact_match("$1,000.", "steps\n#### 1000") == 1.0
    assert B.gsm8k_exact_match("[invalid]", "#### 3") == 0.0


def test_cli_suite_prints_the_row_and_writes_json(lpair, files, tmp_path, capsys):
    from growlm.cli import main

    _, d = lpair
    out = tmp_path / "lb.json"
    rc = main(["eval", "--model", str(d), "--suite", "leaderboard", "--tasks", "truthfulqa_mc2,gsm8k",
               "--data_dir", str(files), "--limit", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["row"]) == ["truthfulqa_mc2", "gsm8k"] and res["results"]["gsm8k"]["n"] == 2
    assert len(res["samples"]["gsm8k"]) == 2 and "generation" in res["samples"]["gsm8k"][0]
    text = capsys.readouterr().out
    assert "seed card" in text and "40.71" in text
    rc = main(["eval", "--model", str(d), "--tasks", "mmlu_anatomy", "--data_dir", str(files)])
    assert rc == 2 and "anatomy_test.csv: missing MMLU subject file" in capsys.readouterr().err
