"""Open LLM Leaderboard data read from local files, with lm-evaluation-harness 0.4 prompts and answer rules.

| task | files | harness YAML |
|---|---|---|
| mmlu (Hendrycks et al. 2021), 57 subjects | `mmlu/test/<subject>_test.csv`, few-shot pool `mmlu/dev/<subject>_dev.csv` (header-less question,A,B,C,D,letter) | `mmlu/default/_default_template_yaml` |
| truthfulqa_mc1 / _mc2 (Lin et al. 2022) | `truthfulqa/mc_task.json` (original release) or HF-schema json/jsonl | `truthfulqa/truthfulqa_mc{1,2}.yaml` |
| gsm8k (Cobbe et al. 2021) | `gsm8k/test.jsonl`, few-shot pool `gsm8k/train.jsonl` {question, answer} | `gsm8k/gsm8k.yaml` |

A malformed row raises GrowlmError "<file>:<line>: <problem>"; a missing subject file names the path.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from growlm.errors import GrowlmError
from growlm.eval.tasks import Doc, _field, _open_text, read_records

# -- MMLU ------------------------------------------------------------------------------------------
# subject -> category, as lm_eval/tasks/mmlu/_generate_configs.py groups them (stem, humanities, ...)
_CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
MMLU_SUBJECTS: dict[str, str] = dict(sorted((s, c) for c, names in _CATEGORIES.items() for s in names.split()))
MMLU_CHOICES = ["A", "B", "C", "D"]


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def mmlu_prompt(doc: Doc) -> str:
    """doc_to_text of the harness's default MMLU template."""
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def mmlu_fewshot(subject: str, shots: list[Doc]) -> str:
    """Description and the dev examples, each 'prompt A\\n\\n' (first_n sampler, target delimiter ' ')."""
    return mmlu_description(subject) + "".join(f"{mmlu_prompt(d)} {MMLU_CHOICES[d['answer']]}\n\n" for d in shots)


def mmlu_dir(data_dir: str | Path) -> Path:
    """The folder holding test/ (and dev/): data_dir/mmlu or data_dir itself."""
    d = Path(data_dir).expanduser()
    for base in (d / "mmlu", d):
        if (base / "test").is_dir():
            return base
    raise GrowlmError(f"no mmlu data under {d} (looked for test/<subject>_test.csv in {d / 'mmlu'} and {d})")


def read_mmlu_csv(path: Path) -> list[Doc]:
    """Rows question,A,B,C,D,letter of one subject file; HF schema {question, choices, answer (0-3)}."""
    if not path.is_file():
        raise GrowlmError(f"{path}: missing MMLU subject file")
    reader = csv.reader(io.StringIO(_open_text(path), newline=""))
    docs, start = [], 1
    try:
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not row:
                continue
            if len(row) != 6:
                raise GrowlmError(f"{where}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
            letter = row[5].strip()
            if letter not in MMLU_CHOICES:
                raise GrowlmError(f"{where}: answer {row[5]!r} is not one of A, B, C, D")
            docs.append({"question": row[0], "choices": row[1:5], "answer": MMLU_CHOICES.index(letter)})
    except csv.Error as e:
        raise GrowlmError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    if not docs:
        raise GrowlmError(f"{path}: no items")
    return docs


def mmlu_subject_files(data_dir: str | Path, subject: str) -> tuple[Path, Path]:
    if subject not in MMLU_SUBJECTS:
        raise GrowlmError(f"unknown MMLU subject {subject!r}; choose from: {', '.join(MMLU_SUBJECTS)}")
    base = mmlu_dir(data_dir)
    return base / "test" / f"{subject}_test.csv", base / "dev" / f"{subject}_dev.csv"


# -- TruthfulQA ------------------------------------------------------------------------------------
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def truthfulqa_prompt(doc: Doc) -> str:
    return TRUTHFULQA_PREAMBLE + "\n\nQ: " + doc["question"] + "\nA:"


def truthfulqa_file(data_dir: str | Path) -> Path:
    d = Path(data_dir).expanduser()
    if d.is_file():
        return d
    for base in (d / "truthfulqa", d):
        for pattern in ("mc_task.json", "validation*.jsonl", "validation*.json", "*.jsonl"):
            hits = sorted(h for h in base.glob(pattern) if h.is_file())
            if hits:
                return hits[0]
    raise GrowlmError(f"no truthfulqa data under {d} (looked for mc_task.json in {d / 'truthfulqa'} and {d})")


def _targets(where: str, rec: Doc, name: str, one_true: bool) -> dict[str, list]:
    """{choices, labels} from the original {answer: 0/1} dict or the HF schema {choices, labels}."""
    t = _field(where, rec, name, dict)
    if "choices" in t and "labels" in t:
        choices, labels = t["choices"], t["labels"]
    else:
        choices, labels = list(t), list(t.values())
    if (not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels)
            or not choices or not all(isinstance(c, str) for c in choices)
            or not all(x in (0, 1) and not isinstance(x, bool) for x in labels)):
        raise GrowlmError(f"{where}: {name} must map answer texts to 0/1 labels")
    if not any(labels) or (one_true and (labels[0] != 1 or sum(labels) != 1)):
        raise GrowlmError(f"{where}: {name} needs {'exactly one true answer, listed first' if one_true else 'a true answer'}")
    return {"choices": list(choices), "labels": list(labels)}


def read_truthfulqa(path: Path) -> list[Doc]:
    docs = []
    json_list = path.suffix == ".json" and _open_text(path).lstrip().startswith("[")
    for line, rec in read_records(path):
        where = f"{path}:item {line}" if json_list else f"{path}:{line}"  # mc_task.json: a list on few lines
        docs.append({"question": _field(where, rec, "question"),
                     "mc1_targets": _targets(where, rec, "mc1_targets", True),
                     "mc2_targets": _targets(where, rec, "mc2_targets", False)})
    if not docs:
        raise GrowlmError(f"{path}: no items")
    return docs


# -- GSM8K -----------------------------------------------------------------------------------------
GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]
GSM8K_MAX_GEN_TOKS = 256  # the harness's default max_gen_toks (gsm8k.yaml sets none)
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def gsm8k_prompt(doc: Doc) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def gsm8k_example(doc: Doc) -> str:
    return f"{gsm8k_prompt(doc)} {doc['answer']}\n\n"


def gsm8k_files(data_dir: str | Path) -> tuple[Path, Path]:
    """(test file, train file): data_dir/gsm8k/{test,train}.jsonl, data_dir/{...}, or a test file and its
    train.jsonl neighbour."""
    d = Path(data_dir).expanduser()
    if d.is_file():
        return d, d.with_name("train.jsonl")
    for base in (d / "gsm8k", d):
        if (base / "test.jsonl").is_file():
            return base / "test.jsonl", base / "train.jsonl"
    raise GrowlmError(f"no gsm8k data under {d} (looked for test.jsonl in {d / 'gsm8k'} and {d})")


def read_gsm8k(path: Path) -> list[Doc]:
    if not path.is_file():
        raise GrowlmError(f"{path}: missing GSM8K file")
    docs = []
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        answer = _field(where, rec, "answer")
        if "#### " not in answer:
            raise GrowlmError(f"{where}: answer has no '#### <number>' final line")
        docs.append({"question": _field(where, rec, "question"), "answer": answer})
    if not docs:
        raise GrowlmError(f"{path}: no items")
    return docs


def _regex_filter(pattern: re.Pattern, text: str, group_select: int) -> str:
    """lm_eval.filters.extraction.RegexFilter, then take_first."""
    match = pattern.findall(text)
    if not match:
        return "[invalid]"
    match = match[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "[invalid]")
    return match.strip()


def gsm8k_extract(text: str) -> dict[str, str]:
    """The answers of the harness's two filters: strict-match ('#### n') and flexible-extract (last number)."""
    return {"strict-match": _regex_filter(_STRICT, text, 0), "flexible-extract": _regex_filter(_FLEXIBLE, text, -1)}


def gsm8k_exact_match(prediction: str, reference: str) -> float:
    """exact_match with gsm8k.yaml's regexes_to_ignore and ignore_case."""
    for r in _IGNORE:
        prediction, reference = re.sub(r, "", prediction), re.sub(r, "", reference)
    return float(prediction.lower() == reference.lower())
