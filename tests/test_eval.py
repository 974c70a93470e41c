"""Evaluation equals lm-evaluation-harness 0.4 on the same model, items and files.

The reference is the harness itself: its HFLM backend on a Hugging Face export of the same growlm model,
and its own task YAMLs pointed at local jsonl files (`dataset_path: json`). Tiny random models (float32),
a byte-level BPE trained here on the embedded Shakespeare plays, a few items per task. Only the tests that
read real task files need ../shared/data; log-likelihoods of given pairs and rolling windows need nothing.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_data, tiny_config
from growlm.errors import GrowlmError
from growlm.eval import (
    evaluate,
    loglikelihood,
    loglikelihood_rolling,
    loglikelihood_tokens,
    mean_stderr,
    perplexity,
    rolling_windows,
    tok_encode,
)
from growlm.eval.tasks import TASKS, WSC273
from growlm.models.assets import shakespeare_files
from growlm.models.model import GPT

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

lm_eval = pytest.importorskip("lm_eval")

N_ITEMS = 3  # per task in the harness pipeline comparison
HARNESS_YAML = {
    "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml", "sciq": "sciq/sciq.yaml", "winogrande": "winogrande/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml", "wikitext": "wikitext/wikitext.yaml",
    "wsc273": "wsc273/default.yaml",
}
SCIQ_ITEMS = [  # synthetic: no SciQ file is available offline
    {"question": "What gas do plants absorb?", "distractor1": "oxygen", "distractor2": "helium",
     "distractor3": "neon", "correct_answer": "carbon dioxide", "support": " Plants take in carbon dioxide."},
    {"question": "What is frozen water called?", "distractor1": "steam", "distractor2": "vapor",
     "distractor3": "mist", "correct_answer": "ice", "support": ""},
    {"question": "Which organ pumps blood?", "distractor1": "lung", "distractor2": "liver",
     "distractor3": "kidney", "correct_answer": "heart", "support": "The heart is a muscle.\nIt pumps blood."},
]


def hf_records(name: str, data: Path) -> list[dict]:
    """The first items of a task as Hugging Face-schema records (what the harness's YAML expects)."""
    if name == "sciq":
        return SCIQ_ITEMS
    task = TASKS[name]
    path = task.find_file(data)
    if name == "wsc273":  # raw records: the harness applies its own option normalisation
        return [r for _, r in WSC273.xml_records(path)][:N_ITEMS]
    docs = task.load(path)
    if name == "wikitext":  # the shortest articles keep the test fast
        docs = sorted(docs, key=lambda d: len(d["page"]))
    return docs[:N_ITEMS]


@pytest.fixture(scope="module")
def data() -> Path:
    return shared_data()


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE of 384 ids trained on the embedded Shakespeare plays: no benchmark file needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f.read_text(encoding="utf-8")[:40_000] for f in shakespeare_files()[:3]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tok, tmp_path_factory):
    """(growlm model, HF directory of the same weights) for one family."""
    from growlm.models.hf import save_hf

    torch.manual_seed(1)
    model = GPT(tiny_config(request.param, vocab_size=len(tok), block_size=512)).eval()
    d = save_hf(model, tmp_path_factory.mktemp(f"hf-{request.param}"), tok)
    return model, d


def hflm(d: Path, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(d), device="cpu", dtype="float32", batch_size=4, **kw)


def instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


REQUESTS = [
    ("Question: Which is a fruit?\nAnswer:", " an apple"),
    ("Question: Which is a fruit?\nAnswer:", " a red brick wall"),
    ("Question: Which is a fruit?\nAnswer: ", "a pear"),  # trailing space moves into the continuation
    ("", "An empty context conditions on the prefix token."),
    ("The end", "."),
    ("Sarah was a better surgeon than Maria so Maria", " always got the easier cases."),
]


# -- 1. parity with lm-evaluation-harness --------------------------------------------------------
def test_loglikelihood_matches_hflm(pair, tok):
    model, d = pair
    ref = hflm(d).loglikelihood(instances("loglikelihood", REQUESTS))
    for share in ("packed", "cache", "none"):
        ours = loglikelihood(model, tok, REQUESTS, batch_size=3, share_context=share)
        torch.testing.assert_close([o[0] for o in ours], [r[0] for r in ref], atol=1e-5, rtol=1e-6)
        assert [o[1] for o in ours] == [r[1] for r in ref]


def test_rolling_matches_hflm(pair, tok):
    model, d = pair
    # no exactly periodic text: lm-eval 0.4.13's one-token-continuation cache mis-scores a rolling window
    # whose context + continuation[:-1] repeats an earlier window's (it gathers the leading positions)
    texts = ["Robert Boulter is an English film, television and theatre actor. " * 4, "short",
             "".join(f"x{i} = y{i * i}\n" for i in range(9))]
    ref = hflm(d, max_length=24).loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
    ours = loglikelihood_rolling(model, tok, texts, batch_size=2, max_length=24)
    assert len(tok_encode(tok, texts[0])) > 2 * 24  # several windows, the last one partial
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    m = perplexity(model, tok, texts, max_length=24)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert m["bits_per_byte"] == pytest.approx(-sum(ref) / (n_bytes * math.log(2)), rel=1e-6)
    assert m["word_perplexity"] == pytest.approx(math.exp(-sum(ref) / sum(len(re.split(r"\s+", t)) for t in texts)),
                                                 rel=1e-5)
    assert "vocab 384" in m["tokenizer"]


def test_strided_windows_score_each_token_once_with_more_context(pair, tok):
    model, _ = pair
    ids = tok_encode(tok, "The quick brown fox jumps over the lazy dog. " * 3)
    L, stride = 16, 5
    wins = rolling_windows(ids, tok.eos_token_id, L, stride)
    assert [t for _, c in wins for t in c] == ids  # every token predicted exactly once, in order
    assert all(len(c) + len(x) - 1 <= L for c, x in wins)
    # a strided total equals scoring each window's predictions from its full in-window context by hand
    lp = model(torch.tensor([[tok.eos_token_id] + ids[:L - 1]])).log_softmax(-1)[0]
    first = lp[torch.arange(L), torch.tensor(ids[:L])].double().sum().item()  # float32 sums are off by ulps of 100
    ours = loglikelihood_tokens(model, wins[:1])[0][0]
    assert ours == pytest.approx(first, abs=1e-5)
    a, b = wins[1]
    lp = model(torch.tensor([(a + b)[:-1]])).log_softmax(-1)[0]
    second = lp[torch.arange(len(a) - 1, len(a) + len(b) - 1), torch.tensor(b)].double().sum().item()
    assert len(a) == L - stride + 1 - (len(b) - stride) and len(b) == stride
    assert loglikelihood_tokens(model, wins[1:2])[0][0] == pytest.approx(second, abs=1e-5)


def run_harness(d: Path, files: dict[str, Path], tmp: Path, num_fewshot: int = 0, limit: int | None = None):
    """lm-evaluation-harness's own task pipeline (its YAMLs, preprocessing, metrics) on local jsonl files."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ydir = tmp / "yaml"
    ydir.mkdir(exist_ok=True)
    root = Path(lm_eval.__file__).parent / "tasks"
    for name, f in files.items():
        (ydir / f"{name}_local.yaml").write_text(
            f"include: {root / HARNESS_YAML[name]}\ntask: {name}_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {f}\ntraining_split: null\nvalidation_split: null\n"
            "test_split: test\nfewshot_split: test\n")
    out = simple_evaluate(model=hflm(d), tasks=[f"{n}_local" for n in files], num_fewshot=num_fewshot,
                          task_manager=TaskManager(include_path=str(ydir), include_defaults=False),
                          log_samples=True, bootstrap_iters=0, limit=limit)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def task_files(data, tmp_path_factory) -> Path:
    """Each task's first items as HF-schema jsonl, in the folder layout `--data-dir` expects."""
    root = tmp_path_factory.mktemp("tasks")
    for name in HARNESS_YAML:
        write_jsonl(root / TASKS[name].folder / f"test_{name}.jsonl", hf_records(name, data))
    return root


def _file(root: Path, name: str) -> Path:
    return root / TASKS[name].folder / f"test_{name}.jsonl"


def test_every_task_matches_harness_pipeline(pair, tok, task_files, tmp_path):
    model, d = pair
    ref = run_harness(d, {n: _file(task_files, n) for n in HARNESS_YAML}, tmp_path)
    for name in HARNESS_YAML:
        ours = evaluate(model, tok, [name], str(_file(task_files, name)), batch_size=4)
        res, samples = ours["results"][name], ours["samples"][name]
        hres = ref["results"][f"{name}_local"]
        hsamples = sorted(ref["samples"][f"{name}_local"], key=lambda s: s["doc_id"])
        assert len(samples) == len(hsamples) == N_ITEMS, name
        for s, h in zip(samples, hsamples):
            if TASKS[name].output_type == "loglikelihood_rolling":
                assert s["loglikelihood"] == pytest.approx(h["resps"][0][0], abs=1e-5, rel=1e-6), name
                continue
            # the harness sums in float32: one ulp of a sum near -100 is 7.6e-6, hence rtol 1e-6 on top of 1e-5
            torch.testing.assert_close(s["loglikelihoods"], [r[0][0] for r in h["resps"]], atol=1e-5, rtol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
            assert s["is_greedy"] == [r[0][1] for r in h["resps"]], name
            for metric in ("acc", "acc_norm"):
                if metric in h:
                    assert s[metric] == h[metric], (name, metric, s, h)
        for metric in TASKS[name].metrics:
            assert res[metric] == pytest.approx(hres[f"{metric},none"], rel=1e-5), (name, metric)


def test_fewshot_sampling_matches_harness(pair, tok, task_files, tmp_path):
    model, d = pair
    names = ["arc_easy", "winogrande"]  # one question-answer task, one multiple-input task
    ref = run_harness(d, {n: _file(task_files, n) for n in names}, tmp_path, num_fewshot=2)
    for name in names:
        ours = evaluate(model, tok, [name], str(_file(task_files, name)), num_fewshot=2)["samples"][name]
        hs = sorted(ref["samples"][f"{name}_local"], key=lambda s: s["doc_id"])
        assert len(ours) == len(hs) == N_ITEMS
        for s, h in zip(ours, hs):
            assert h["arguments"][0][0].count("\n\n") == 2  # two examples really were prepended
            torch.testing.assert_close(s["loglikelihoods"], [r[0][0] for r in h["resps"]], atol=1e-5, rtol=1e-6)


def test_data_dir_layout_and_limit(pair, tok, task_files):
    model, _ = pair
    out = evaluate(model, tok, "piqa,lambada_openai", str(task_files), limit=2)
    assert out["results"]["piqa"]["n"] == 2 and out["results"]["lambada_openai"]["n"] == 2
    xs = [s["acc"] for s in out["samples"]["piqa"]]
    assert out["results"]["piqa"]["acc_stderr"] == pytest.approx(mean_stderr(xs))
    full = evaluate(model, tok, "piqa", str(task_files))["samples"]["piqa"]
    assert len(full) == N_ITEMS  # the limit takes the first documents (batching may move the last ulp)
    for a, b in zip(out["samples"]["piqa"], full[:2], strict=True):
        torch.testing.assert_close(a.pop("loglikelihoods"), b.pop("loglikelihoods"), atol=1e-6, rtol=0)
        assert a == b


@pytest.mark.slow
def test_smollm2_hellaswag_matches_harness(smollm2, data, tmp_path):
    """The real default model: per-item log-likelihoods within 1e-3 of the harness on 20 HellaSwag items."""
    from growlm.models.hf import default_model_dir

    model, tok = smollm2
    n = 20
    f = write_jsonl(tmp_path / "hellaswag.jsonl", TASKS["hellaswag"].load(TASKS["hellaswag"].find_file(data))[:n])
    ref = run_harness(default_model_dir(), {"hellaswag": f}, tmp_path)
    ours = evaluate(model, tok, ["hellaswag"], str(f), batch_size=8)["samples"]["hellaswag"]
    hs = sorted(ref["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    assert len(ours) == len(hs) == n
    close_calls = []  # items whose top two choices are closer than the tolerance: the argmax may differ
    choices = [TASKS["hellaswag"].doc_to_choice(d) for d in TASKS["hellaswag"].load(f)]
    for i, (s, h) in enumerate(zip(ours, hs)):
        hl = [r[0][0] for r in h["resps"]]
        torch.testing.assert_close(s["loglikelihoods"], hl, atol=1e-3, rtol=0)
        raw = sorted(hl, reverse=True)
        norm = sorted((ll / len(c) for ll, c in zip(hl, choices[i])), reverse=True)
        if raw[0] - raw[1] < 1e-3 or norm[0] - norm[1] < 1e-3:
            close_calls.append(i)
            continue
        assert (s["acc"], s["acc_norm"]) == (h["acc"], h["acc_norm"]), i
    assert len(close_calls) <= 2, f"items whose top two choices are within 1e-3: {close_calls}"


# -- 2. shared-context scoring -----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_context_equals_naive(family):
    torch.manual_seed(0)
    model = GPT(tiny_config(family, block_size=32)).eval()
    rng = random.Random(0)
    reqs = []
    for _ in range(5):
        ctx = [rng.randrange(96) for _ in range(rng.randrange(1, 12))]
        for _ in range(rng.randrange(1, 5)):
            reqs.append((ctx, [rng.randrange(96) for _ in range(rng.randrange(1, 8))]))
    reqs.append(([1] * 30, [2, 3, 4, 5]))  # left-truncated to the context length
    reqs.append(([1] * 30, [2, 3]))
    naive = loglikelihood_tokens(model, reqs, batch_size=1, share_context="none")
    for how in ("packed", "cache"):
        shared = loglikelihood_tokens(model, reqs, batch_size=3, share_context=how)
        torch.testing.assert_close([s[0] for s in shared], [n[0] for n in naive], atol=1e-5, rtol=0)
        assert [s[1] for s in shared] == [n[1] for n in naive]
    # a greedy continuation is recognised on both paths
    ctx = [5, 6, 7]
    greedy = []
    for _ in range(3):
        greedy.append(int(model(torch.tensor([ctx + greedy]))[0, -1].argmax()))
    res = loglikelihood_tokens(model, [(ctx, greedy), (ctx, greedy[:1] + [(greedy[1] + 1) % 96])])
    assert [r[1] for r in res] == [True, False]
    # and both equal the plain full-sequence forward pass
    for (ctx, cont), (ll, _) in zip(reqs, naive):
        inp = (ctx + cont)[-33:]
        lp = model(torch.tensor([inp[:-1]])).log_softmax(-1)[0, -len(cont):]
        assert ll == pytest.approx(lp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-5)


def test_bf16_autocast_close_to_float32():
    model = GPT(tiny_config("llama")).eval()
    reqs = [([1, 2, 3, 4], [5, 6]), ([1, 2, 3, 4], [7]), ([9], [8, 7, 6])]
    a = loglikelihood_tokens(model, reqs, dtype="float32")
    b = loglikelihood_tokens(model, reqs, dtype="bfloat16")
    torch.testing.assert_close([x[0] for x in b], [x[0] for x in a], atol=0.05, rtol=0.01)


# -- 3. malformed files -------------------------------------------------------------------------
GOOD_PIQA = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}


@pytest.mark.parametrize(
    "task, lines, line_no, problem",
    [
        ("piqa", [GOOD_PIQA, {"goal": "g", "sol1": "a", "label": 1}], 2, "missing field 'sol2'"),
        ("piqa", [GOOD_PIQA, GOOD_PIQA, {**GOOD_PIQA, "label": 2}], 3, "label 2 is out of range"),
        ("hellaswag", [{"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["1", "2"], "label": 5}], 1,
         "label 5 is out of range"),
        ("arc_easy", [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}], 1,
         "answerKey 'C' is not one of the choice labels"),
        ("winogrande", [{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}], 1, "no '_' blank"),
        ("lambada_openai", [{"text": "two words"}, {"page": "wrong schema"}], 2, "missing field 'text'"),
        ("sciq", [{**SCIQ_ITEMS[0], "support": 3}], 1, "field 'support' must be a str"),
        ("piqa", ["not an object"], 1, "expected a JSON object"),
    ],
)
def test_malformed_file_names_file_line_and_problem(tmp_path, task, lines, line_no, problem):
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(GrowlmError) as e:
        TASKS[task].load(f)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{f}:{line_no}: ") and problem in msg, msg


def test_malformed_json_and_text_formats(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(GOOD_PIQA) + "\n{oops\n")
    with pytest.raises(GrowlmError, match=re.escape(f"{f}:2: not valid JSON")):
        TASKS["piqa"].load(f)
    h = tmp_path / "hellaswag_val_full.txt"
    h.write_text("Label: a context\n7\ne0\ne1\ne2\ne3\n")
    with pytest.raises(GrowlmError, match=re.escape(f"{h}:2: label 7 is out of range")):
        TASKS["hellaswag"].load(h)
    with pytest.raises(GrowlmError, match="unknown task"):
        evaluate(None, None, ["nope"], str(tmp_path))
    with pytest.raises(GrowlmError, match="no piqa data"):
        evaluate(None, None, ["piqa"], str(tmp_path / "empty"))


def test_parquet_json_and_jsonl_read_alike(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    recs = [GOOD_PIQA, {**GOOD_PIQA, "goal": "h", "label": 1}]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "v.parquet")
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "l.json").write_text("".join(json.dumps(r) + "\n" for r in recs))  # datasets' to_json: lines
    want = TASKS["piqa"].load(write_jsonl(tmp_path / "v.jsonl", recs))
    for name in ("v.parquet", "a.json", "l.json"):
        assert TASKS["piqa"].load(tmp_path / name) == want, name


def test_original_release_formats_read_like_hf_schema(data):
    """ARC's original jsonl equals the HF schema; PIQA labels come from valid-labels.lst."""
    arc = TASKS["arc_easy"].load(data / "arc" / "genmc_arc_easy_official_test.jsonl")
    keys = [json.loads(x)["answerKey"] for x in (data / "arc" / "aristo_arc_easy_test_answers.jsonl").open()]
    assert [d["answerKey"] for d in arc] == keys
    assert set(arc[0]) == {"id", "question", "choices", "answerKey"} and isinstance(arc[0]["question"], str)
    piqa = TASKS["piqa"].load(data / "piqa" / "valid.jsonl")
    labels = (data / "piqa" / "valid-labels.lst").read_text().split()
    assert len(piqa) == 1838 and [d["label"] for d in piqa] == [int(x) for x in labels]
    wiki = TASKS["wikitext"].load(data / "wikitext2" / "wiki.test.raw")
    assert len(wiki) == 62 and wiki[0]["page"].lstrip().startswith("= Robert Boulter =")
    wsc = TASKS["wsc273"].load(data / "wsc273" / "WSCollection.xml")
    assert len(wsc) == 273 and wsc[0]["options"] == ["the city councilmen", "the demonstrators"]


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_eval_writes_json_and_reports_user_errors(pair, tok, task_files, tmp_path, capsys):
    from growlm.cli import main

    model, d = pair
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(d), "--tasks", "piqa,wsc273", "--data_dir", str(task_files), "--limit", "2",
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    direct = evaluate(model, tok, "piqa,wsc273", str(task_files), limit=2)
    assert res["results"]["piqa"]["acc"] == direct["results"]["piqa"]["acc"]
    assert res["samples"]["wsc273"][0]["loglikelihoods"] == pytest.approx(
        direct["samples"]["wsc273"][0]["loglikelihoods"], abs=1e-5)
    assert "piqa" in capsys.readouterr().out
    assert main(["eval", "--model", str(d), "--tasks", "piqa", "--data_dir", str(tmp_path / "absent")]) == 2
    assert main(["eval", "--model", str(d), "--tasks", "mmlu_nope", "--data_dir", str(task_files)]) == 2
    assert main(["eval", "--model", str(d), "--tasks", "mmlu", "--data_dir", str(task_files)]) == 2
    err = capsys.readouterr().err
    assert "no such data directory" in err and "unknown task 'mmlu_nope'" in err and "no mmlu data under" in err
