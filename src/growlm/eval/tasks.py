"""Benchmark tasks read from local files, with lm-evaluation-harness 0.4 prompts and preprocessing.

Each task reads its Hugging Face schema (jsonl, json or parquet) and the original release formats:

| task | HF schema | original release |
|---|---|---|
| hellaswag (Zellers et al. 2019) | activity_label, ctx_a, ctx_b, endings, label | rowanz jsonl (same fields); 6-line text (klosax) |
| piqa (Bisk et al. 2020) | goal, sol1, sol2, label | valid.jsonl + valid-labels.lst |
| arc_easy / arc_challenge (Clark et al. 2018) | question, choices{text,label}, answerKey | question{stem, choices[{text,label}]} |
| sciq (Welbl et al. 2017) | question, distractor1-3, correct_answer, support | - |
| winogrande (Sakaguchi et al. 2020) | sentence, option1, option2, answer | same jsonl (+ extra fields) |
| lambada_openai (Paperno et al. 2016; OpenAI's version) | text | same |
| wikitext (Merity et al. 2016), document level | page | wiki.test.raw (split at top-level headings) |
| wsc273 (Levesque et al. 2012) | text, pronoun, pronoun_loc, options, label | WSCollection.xml |

Prompts follow `lm_eval/tasks/<name>/*.yaml` exactly; the comments name the harness's field templates.
A malformed file raises GrowlmError "<file>:<line>: <problem>".

Caveat: the 6-line HellaSwag text format was built from `ctx` rather than `ctx_a + " " + ctx_b.capitalize()`,
so an item whose ctx_b starts lowercase can differ from the harness's prompt by that one capital letter.
"""

from __future__ import annotations

import bz2
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from growlm.errors import GrowlmError

Doc = dict[str, Any]


# -- reading records -----------------------------------------------------------------------------
def _open_text(path: Path) -> str:
    try:
        raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GrowlmError(f"{path}: cannot read ({e})") from None


def read_records(path: Path) -> Iterator[tuple[int, Doc]]:
    """(line or row number, record) from a .jsonl, .json (a list of objects) or .parquet file."""
    name = path.name.removesuffix(".bz2")
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for bad files
            raise GrowlmError(f"{path}: not a readable parquet file ({e})") from None
        yield from ((i + 1, r) for i, r in enumerate(rows))
        return
    text = _open_text(path)
    data = None
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": JSON lines in a .json file (datasets' to_json writes those)
                raise GrowlmError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if data is not None:
        data = [data] if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise GrowlmError(f"{path}:1: expected a JSON list of objects")
        for i, r in enumerate(data):
            if not isinstance(r, dict):
                raise GrowlmError(f"{path}:item {i + 1}: expected a JSON object, got {type(r).__name__}")
            yield i + 1, r
        return
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise GrowlmError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise GrowlmError(f"{path}:{i + 1}: expected a JSON object, got {type(r).__name__}")
        yield i + 1, r


def _field(where: str, rec: Doc, name: str, kind: type | tuple[type, ...] = str) -> Any:
    if name not in rec:
        raise GrowlmError(f"{where}: missing field '{name}' (fields present: {', '.join(sorted(rec)) or 'none'})")
    v = rec[name]
    if not isinstance(v, kind) or isinstance(v, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise GrowlmError(f"{where}: field '{name}' must be a {want}, got {type(v).__name__} {v!r:.40}")
    return v


def _str_list(where: str, rec: Doc, name: str, min_len: int = 2) -> list[str]:
    v = _field(where, rec, name, list)
    if len(v) < min_len or not all(isinstance(x, str) for x in v):
        raise GrowlmError(f"{where}: field '{name}' must be a list of at least {min_len} strings")
    return v


def _label(where: str, v: Any, n: int, name: str = "label") -> int:
    """An integer label (int or digit string) in range(n)."""
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise GrowlmError(f"{where}: {name} {v!r} is not an integer")
    if not 0 <= v < n:
        raise GrowlmError(f"{where}: {name} {v} is out of range (expected 0..{n - 1})")
    return v


# -- tasks ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A task: how to find and read its files, and the harness's doc_to_text / doc_to_choice / doc_to_target."""

    name: str
    folder: str
    """Subfolder of --data-dir searched besides --data-dir itself."""
    files: tuple[str, ...]
    """File names (globs) tried in order."""
    output_type: str = "multiple_choice"
    """'multiple_choice', 'loglikelihood' or 'loglikelihood_rolling', as in the harness."""
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    multiple_input: bool = False
    """The choices complete the context and the continuation is shared (winogrande, wsc273)."""

    # -- data ------------------------------------------------------------
    def find_file(self, data_dir: str | Path) -> Path:
        d = Path(data_dir).expanduser()
        if d.is_file():
            return d
        for base in (d / self.folder, d):
            for pattern in self.files:
                # answer keys and label lists sit beside the data: never take them for the data
                hits = sorted(h for h in base.glob(pattern) if h.is_file() and not re.search(r"answers|labels", h.name))
                if hits:
                    return hits[0]
        raise GrowlmError(
            f"no {self.name} data under {d} (looked for {', '.join(self.files)} in {d / self.folder} and {d})"
        )

    def load(self, path: Path) -> list[Doc]:
        docs = [self.parse(f"{path}:{line}", rec) for line, rec in read_records(path)]
        if not docs:
            raise GrowlmError(f"{path}: no items")
        return docs

    def parse(self, where: str, rec: Doc) -> Doc:
        raise NotImplementedError

    # -- prompts (harness semantics) ---------------------------------------
    def doc_to_text(self, doc: Doc) -> str | int:
        raise NotImplementedError

    def doc_to_choice(self, doc: Doc) -> list[str]:
        return []

    def doc_to_target(self, doc: Doc) -> int | str:
        raise NotImplementedError

    def fewshot_example(self, doc: Doc) -> str:
        """q + target_delimiter + answer + fewshot_delimiter (ConfigurableTask.build_qa_turn)."""
        q, c, a = self.doc_to_text(doc), self.doc_to_choice(doc), self.doc_to_target(doc)
        if self.multiple_input:
            q, c = c[q], None
        answer = c[a] if (c and isinstance(a, int)) else a
        return f"{q} {answer}\n\n"

    def requests(self, doc: Doc, fewshot: str = "") -> list[tuple[str, str]]:
        """(context, continuation) string pairs for one document."""
        if self.output_type == "loglikelihood_rolling":
            return [("", self.doc_to_target(doc))]
        if self.output_type == "loglikelihood":
            return [(fewshot + self.doc_to_text(doc), self.doc_to_target(doc))]
        choices = self.doc_to_choice(doc)
        if self.multiple_input:
            return [(fewshot + c, " " + self.doc_to_target(doc)) for c in choices]
        return [(fewshot + self.doc_to_text(doc), " " + c) for c in choices]

    def gold(self, doc: Doc) -> int:
        return self.doc_to_text(doc) if self.multiple_input else self.doc_to_target(doc)


def hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py preprocess: WikiHow bracket artifacts removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(Task):
    def load(self, path: Path) -> list[Doc]:
        if path.name.removesuffix(".bz2").endswith(".txt"):
            return self._load_text(path)
        return super().load(path)

    def _load_text(self, path: Path) -> list[Doc]:
        lines = _open_text(path).splitlines()
        if len(lines) % 6 != 0:
            raise GrowlmError(f"{path}:{len(lines)}: expected 6 lines per item (context, label, 4 endings), "
                              f"got {len(lines)} lines")
        docs = []
        for i in range(0, len(lines), 6):
            where = f"{path}:{i + 1}"
            head = lines[i]
            if ": " not in head:
                raise GrowlmError(f"{where}: expected '<activity_label>: <context>'")
            al, ctx = head.split(": ", 1)
            label = _label(f"{path}:{i + 2}", lines[i + 1], 4)
            docs.append({"activity_label": al, "ctx_a": ctx, "ctx_b": "", "endings": lines[i + 2: i + 6],
                         "label": label})
        return docs

    def parse(self, where, rec):
        endings = _str_list(where, rec, "endings")
        return {"activity_label": _field(where, rec, "activity_label"), "ctx_a": _field(where, rec, "ctx_a"),
                "ctx_b": _field(where, rec, "ctx_b"), "endings": endings,
                "label": _label(where, _field(where, rec, "label", (int, str)), len(endings))}

    def doc_to_text(self, doc):
        return hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())

    def doc_to_choice(self, doc):
        return [hellaswag_preprocess(e) for e in doc["endings"]]

    def doc_to_target(self, doc):
        return doc["label"]


class PIQA(Task):
    def load(self, path: Path) -> list[Doc]:
        labels_file = path.with_name(path.name.split(".")[0] + "-labels.lst")
        labels = _open_text(labels_file).split() if labels_file.exists() else None
        docs = []
        for n, (line, rec) in enumerate(read_records(path)):
            where = f"{path}:{line}"
            if "label" not in rec and labels is not None:
                if n >= len(labels):
                    raise GrowlmError(f"{labels_file}:{n + 1}: missing label (the file has {len(labels)} labels)")
                rec = {**rec, "label": labels[n]}
            elif "label" not in rec:
                raise GrowlmError(f"{where}: missing field 'label' (and no {labels_file.name} beside the file)")
            docs.append(self.parse(where, rec))
        if not docs:
            raise GrowlmError(f"{path}: no items")
        return docs

    def parse(self, where, rec):
        return {"goal": _field(where, rec, "goal"), "sol1": _field(where, rec, "sol1"),
                "sol2": _field(where, rec, "sol2"), "label": _label(where, rec["label"], 2)}

    def doc_to_text(self, doc):
        return f"Question: {doc['goal']}\nAnswer:"

    def doc_to_choice(self, doc):
        return [doc["sol1"], doc["sol2"]]

    def doc_to_target(self, doc):
        return doc["label"]


class ARC(Task):
    def parse(self, where, rec):
        q = rec.get("question")
        if isinstance(q, dict):  # original ARC release: question{stem, choices[{text, label}]}
            stem = _field(where, q, "stem")
            raw = _field(where, q, "choices", list)
            if not all(isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("label"), str)
                       for c in raw):
                raise GrowlmError(f"{where}: question.choices must be a list of {{text, label}} objects")
            choices = {"text": [c["text"] for c in raw], "label": [c["label"] for c in raw]}
        else:
            stem = _field(where, rec, "question")
            choices = _field(where, rec, "choices", dict)
            _str_list(where, choices, "text")
            _str_list(where, choices, "label")
            if len(choices["text"]) != len(choices["label"]):
                raise GrowlmError(f"{where}: choices.text and choices.label differ in length")
        key = _field(where, rec, "answerKey")
        if key not in choices["label"]:
            raise GrowlmError(f"{where}: answerKey {key!r} is not one of the choice labels "
                              f"{', '.join(choices['label'])}")
        return {"id": rec.get("id", ""), "question": stem,
                "choices": {"text": list(choices["text"]), "label": list(choices["label"])}, "answerKey": key}

    def doc_to_text(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_choice(self, doc):
        return doc["choices"]["text"]

    def doc_to_target(self, doc):
        return doc["choices"]["label"].index(doc["answerKey"])


class SciQ(Task):
    FIELDS = ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support")

    def parse(self, where, rec):
        return {k: _field(where, rec, k) for k in self.FIELDS}

    def doc_to_text(self, doc):
        return f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"

    def doc_to_choice(self, doc):
        return [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]

    def doc_to_target(self, doc):
        return 3


class WinoGrande(Task):
    def parse(self, where, rec):
        sentence = _field(where, rec, "sentence")
        if "_" not in sentence:
            raise GrowlmError(f"{where}: sentence has no '_' blank to fill")
        answer = _field(where, rec, "answer", (str, int))
        if str(answer) not in ("1", "2"):
            raise GrowlmError(f"{where}: answer {answer!r} is out of range (expected '1' or '2')")
        return {"sentence": sentence, "option1": _field(where, rec, "option1"),
                "option2": _field(where, rec, "option2"), "answer": str(answer)}

    def doc_to_text(self, doc):
        return {"1": 0, "2": 1}[doc["answer"]]

    def doc_to_choice(self, doc):
        idx = doc["sentence"].index("_")
        return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]

    def doc_to_target(self, doc):
        idx = doc["sentence"].index("_") + 1
        return doc["sentence"][idx:].strip()


class Lambada(Task):
    def parse(self, where, rec):
        text = _field(where, rec, "text")
        if " " not in text.strip():
            raise GrowlmError(f"{where}: text needs at least two words (context and target word)")
        return {"text": text}

    def doc_to_text(self, doc):
        return " ".join(doc["text"].split(" ")[:-1])

    def doc_to_target(self, doc):
        return " " + doc["text"].split(" ")[-1]


def wikitext_detokenizer(string: str) -> str:
    """lm_eval/tasks/wikitext/preprocess_wikitext.py: undo WikiText's tokenisation."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    return string.replace(" 's", "'s")


def split_wikitext_documents(text: str) -> list[str]:
    """Articles of a raw WikiText file: a new one starts at each top-level heading line ' = Title = '."""
    docs: list[list[str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        s = line.strip()
        if s.startswith("= ") and s.endswith(" =") and not s.startswith("= ="):
            docs.append([])
        if not docs:
            docs.append([])
        docs[-1].append(line)
    return [p for p in ("\n".join(d) for d in docs) if p.strip()]


class WikiText(Task):
    def load(self, path: Path) -> list[Doc]:
        name = path.name.removesuffix(".bz2")
        if name.endswith((".raw", ".txt", ".tokens")):
            return [{"page": p} for p in split_wikitext_documents(_open_text(path))]
        return super().load(path)

    def parse(self, where, rec):
        return {"page": _field(where, rec, "page")}

    def doc_to_target(self, doc):
        return wikitext_detokenizer(doc["page"])


WSC_UPPER_PRONOUNS = ("A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their")


class WSC273(Task):
    def load(self, path: Path) -> list[Doc]:
        if path.suffix == ".xml":
            return self._load_xml(path)
        return super().load(path)

    def _load_xml(self, path: Path) -> list[Doc]:
        return [self.parse(where, rec) for where, rec in self.xml_records(path)]

    @staticmethod
    def xml_records(path: Path) -> list[tuple[str, Doc]]:
        """HF-schema records of the Davis/Levesque/Morgenstern XML, converted as the HF `winograd_wsc`
        builder does (whitespace collapsed, label 1 iff correctAnswer contains B), first 273 schemas."""
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise GrowlmError(f"{path}:{e.position[0]}: not valid XML ({e})") from None

        def clean(s: str | None) -> str:
            return " ".join((s or "").split())

        out = []
        for i, schema in enumerate(list(root)[:273]):
            where = f"{path}:schema {i + 1}"
            text, answers = schema.find("text"), schema.find("answers")
            if text is None or answers is None or text.find("pron") is None:
                raise GrowlmError(f"{where}: expected <text> with <txt1>/<pron>/<txt2> and <answers>")
            left, right = clean(text.findtext("txt1", "")), clean(text.findtext("txt2", ""))
            pron = clean(text.findtext("pron"))
            correct = clean(schema.findtext("correctAnswer"))
            if not correct or correct[0] not in "AB":
                raise GrowlmError(f"{where}: correctAnswer {correct!r} is not A or B")
            out.append((where, {"text": " ".join([left, pron, right]).strip(), "pronoun": pron,
                                "pronoun_loc": len(left) + 1 if left else 0,
                                "options": [clean(a.text) for a in answers.findall("answer")],
                                "label": int("B" in correct)}))
        return out

    def parse(self, where, rec):
        text = _field(where, rec, "text").replace("  ", " ")  # utils.process_doc
        options = _str_list(where, rec, "options")
        doc = {"text": text, "pronoun": _field(where, rec, "pronoun"),
               "pronoun_loc": _field(where, rec, "pronoun_loc", int), "options": list(options),
               "label": _label(where, _field(where, rec, "label", (int, str)), len(options))}
        doc["options"] = [self._normalize_option(doc, o) for o in options]
        return doc

    @staticmethod
    def _normalize_option(doc: Doc, option: str) -> str:
        """lm_eval/tasks/wsc273/utils.py: possessive 's and lower-cased pronouns mid-sentence."""
        if doc["pronoun"].lower() in ("my", "his", "her", "our", "their"):
            option += "'s"
        pronoun = option.split()[0]
        start_of_sentence = doc["text"][doc["pronoun_loc"] - 2] == "."
        if not start_of_sentence and pronoun in WSC_UPPER_PRONOUNS:
            return option.replace(pronoun, pronoun.lower())
        return option

    def doc_to_text(self, doc):
        return doc["label"]

    def doc_to_choice(self, doc):
        template = doc["text"][: doc["pronoun_loc"]]
        return [template + doc["options"][0], template + doc["options"][1]]

    def doc_to_target(self, doc):
        return doc["text"][doc["pronoun_loc"] + len(doc["pronoun"]):]


_JSONISH = ("*.jsonl", "*.jsonl.bz2", "*.json", "*.parquet")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        HellaSwag("hellaswag", "hellaswag", ("hellaswag_val.jsonl", "validation*.jsonl", "validation*.parquet",
                                             "hellaswag_val_full.txt", "hellaswag_val_full.txt.bz2", *_JSONISH)),
        PIQA("piqa", "piqa", ("valid.jsonl", "validation*.jsonl", "validation*.parquet", *_JSONISH)),
        ARC("arc_easy", "arc", ("*arc_easy*official_test.jsonl", "*arc_easy*test*.jsonl", "ARC-Easy-Test.jsonl",
                                "ARC-Easy/test*", "arc_easy*")),
        # the complete HF-schema ARC-Challenge test set first (the GenMC copy lacks 2 of 1172 items)
        ARC("arc_challenge", "arc", ("*arc_challenge_test.jsonl", "*arc_challenge*test*.jsonl",
                                     "ARC-Challenge-Test.jsonl", "ARC-Challenge/test*", "arc_challenge*")),
        SciQ("sciq", "sciq", ("test*.jsonl", "test*.parquet", *_JSONISH)),
        WinoGrande("winogrande", "winogrande", ("dev.jsonl", "validation*.jsonl", "validation*.parquet", *_JSONISH),
                   metrics=("acc",), multiple_input=True),
        Lambada("lambada_openai", "lambada", ("lambada_test.jsonl", "test*.jsonl", "test*.parquet", *_JSONISH),
                output_type="loglikelihood", metrics=("perplexity", "acc")),
        WikiText("wikitext", "wikitext2", ("test*.jsonl", "test*.parquet", "wiki.test.raw", *_JSONISH),
                 output_type="loglikelihood_rolling", metrics=("word_perplexity", "byte_perplexity", "bits_per_byte")),
        WSC273("wsc273", "wsc273", ("test*.jsonl", "test*.parquet", "WSCollection.xml", *_JSONISH),
               metrics=("acc",), multiple_input=True),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise GrowlmError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    return TASKS[name]
