"""Official-format LongBench (v1, English): prompts, middle truncation, metrics and scorer.

LongBench cannot be downloaded on the build machines; this module runs on the official
JSONL files when a user has them (one file per dataset, e.g. `hotpotqa.jsonl`, with fields
`input`, `context`, `answers`, `all_classes`, `length`, `dataset`, `_id`):

    rows = longbench_rows("path/to/LongBench/data", tokenizer, LongBenchConfig(max_length=3500))
    records = evaluate(model, tokenizer, rows, plan, cache_dir)        # ffcore.evaluation.runner
    table = longbench_summary(records)                                 # per dataset / category

Prompts are THUDM/LongBench `config/dataset2prompt.json`, generation lengths
`config/dataset2maxlen.json`, truncation and chat handling follow `pred.py` (prompt longer
than `max_length` tokens: keep the first and the last `max_length // 2` tokens, decoded
back to text), and scoring follows `eval.py` (first line only for trec/triviaqa/samsum/lsht,
max over the answers, mean x 100 rounded to 2 decimals) with the metrics of
`ffcore.evaluation.metrics`. Categories are those of the paper's Table 2.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from ffcore.config import StrictConfig
from ffcore.evaluation.metrics import score_prediction
from ffcore.evaluation.suite import make_row

LONGBENCH_SUITE = "longbench-v1"

DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

DATASET2METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1", "musique": "qa_f1", "gov_report": "rouge", "qmsum": "rouge", "multi_news": "rouge",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge", "passage_count": "count",
    "passage_retrieval_en": "retrieval", "lcc": "code_sim", "repobench-p": "code_sim",
}

DATASET2CATEGORY: dict[str, str] = {
    "narrativeqa": "Single-Doc QA", "qasper": "Single-Doc QA", "multifieldqa_en": "Single-Doc QA",
    "hotpotqa": "Multi-Doc QA", "2wikimqa": "Multi-Doc QA", "musique": "Multi-Doc QA",
    "gov_report": "Summarization", "qmsum": "Summarization", "multi_news": "Summarization",
    "trec": "Few-shot", "triviaqa": "Few-shot", "samsum": "Few-shot",
    "passage_count": "Synthetic", "passage_retrieval_en": "Synthetic",
    "lcc": "Code", "repobench-p": "Code",
}
CATEGORIES = ("Single-Doc QA", "Multi-Doc QA", "Summarization", "Few-shot", "Synthetic", "Code")
ENGLISH_DATASETS = tuple(DATASET2PROMPT)
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})  # eval.py: score the first line only
NO_CHAT_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})  # pred.py


@dataclasses.dataclass
class LongBenchConfig(StrictConfig):
    """How official LongBench files are turned into prompts.

    max_length:          prompt token budget; longer prompts are cut in the middle (pred.py).
    datasets:            dataset names to run (None: every English dataset found in the folder).
    max_samples:         first N samples per dataset (None: all).
    use_chat_template:   wrap prompts (except few-shot and code datasets) in the tokenizer's chat
                         template, as pred.py's build_chat does for chat models.
    """

    max_length: int = 3500
    datasets: tuple[str, ...] | None = None
    max_samples: int | None = None
    use_chat_template: bool = False

    def __post_init__(self) -> None:
        if self.datasets is not None:
            self.datasets = tuple(self.datasets)
            unknown = sorted(set(self.datasets) - set(ENGLISH_DATASETS))
            if unknown:
                raise ValueError(f"unknown LongBench dataset(s) {unknown}; English datasets: {list(ENGLISH_DATASETS)}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


def base_name(name: str) -> str:
    """Dataset name without LongBench-E's '_e' suffix ('qasper_e' -> 'qasper')."""
    return name[:-2] if name.endswith("_e") and name[:-2] in DATASET2PROMPT else name


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of one JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_longbench(folder: str | Path, datasets: Sequence[str] | None = None) -> dict[str, Any]:
    """`{dataset: datasets.Dataset}` of the official-format JSONL files in `folder` (English ones known here)."""
    from datasets import Dataset

    folder = Path(folder)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in {folder}; expected LongBench files such as hotpotqa.jsonl")
    out = {}
    for path in files:
        name = path.name.split(".")[0]  # eval.py: dataset = filename.split('.')[0]
        if base_name(name) not in DATASET2PROMPT or (datasets is not None and base_name(name) not in datasets):
            continue
        recs = read_jsonl(path)
        for r in recs:
            r.setdefault("all_classes", None)
            r.setdefault("length", 0)
            r.setdefault("dataset", name)
            r["answers"] = [str(a) for a in r["answers"]]
        out[name] = Dataset.from_list(recs)
    return out


def truncate_middle(prompt: str, tokenizer: Any, max_length: int) -> str:
    """pred.py: if the prompt is longer than max_length tokens, keep the first and last max_length/2 tokens."""
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) > max_length:
        half = int(max_length / 2)
        prompt = (tokenizer.decode(ids[:half], skip_special_tokens=True)
                  + tokenizer.decode(ids[-half:], skip_special_tokens=True))
    return prompt


def build_prompt(record: dict[str, Any], dataset: str, tokenizer: Any, config: LongBenchConfig | None = None) -> str:
    """The official prompt of one record: template, middle truncation, optional chat wrapping."""
    cfg = config or LongBenchConfig()
    prompt = DATASET2PROMPT[base_name(dataset)].format(**record)
    prompt = truncate_middle(prompt, tokenizer, cfg.max_length)
    if cfg.use_chat_template and base_name(dataset) not in NO_CHAT_DATASETS and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return prompt


def longbench_rows(source: str | Path | dict[str, Any], tokenizer: Any, config: LongBenchConfig | None = None) -> Any:
    """Runner rows (`ffcore.evaluation.suite.ROW_FIELDS`) for a folder of LongBench JSONL files."""
    from datasets import Dataset

    cfg = config or LongBenchConfig()
    sets = load_longbench(source, cfg.datasets) if isinstance(source, (str, Path)) else source
    rows = []
    for name, ds in sets.items():
        base = base_name(name)
        n = len(ds) if cfg.max_samples is None else min(len(ds), cfg.max_samples)
        for i in range(n):
            rec = ds[i]
            prompt = build_prompt(rec, name, tokenizer, cfg)
            chat = cfg.use_chat_template and base not in NO_CHAT_DATASETS and getattr(tokenizer, "chat_template", None)
            ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
            classes = list(rec.get("all_classes") or [])
            chance = 1.0 / len(classes) if base == "trec" and classes else (1 / 30 if base == "passage_retrieval_en" else 0.0)
            rows.append(make_row(
                suite=LONGBENCH_SUITE, seed=0, task=name, category=DATASET2CATEGORY[base],
                metric=DATASET2METRIC[base], first_line_only=base in FIRST_LINE_DATASETS, prompt=prompt,
                prompt_ids=ids, answers=list(rec["answers"]), all_classes=classes, chance=chance,
                max_new_tokens=DATASET2MAXLEN[base], stop=["\n"] if base == "samsum" else [],
                meta={"length": rec.get("length", 0), "_id": rec.get("_id"), "index": i,
                      "max_length": cfg.max_length},
            ))
    return Dataset.from_list(rows)


def scorer(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
           all_classes: Sequence[str] | None) -> float:
    """eval.py `scorer`: the dataset's official score (mean x 100, rounded to 2 decimals)."""
    base = base_name(dataset)
    total = 0.0
    for pred, gts in zip(predictions, answers):
        total += score_prediction(pred, gts, DATASET2METRIC[base], all_classes, base in FIRST_LINE_DATASETS)
    return round(100 * total / len(predictions), 2)


def scorer_e(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]], lengths: Sequence[int],
             all_classes: Sequence[str] | None) -> dict[str, float]:
    """eval.py `scorer_e`: scores by context length bucket (0-4k, 4-8k, 8k+ words) for LongBench-E."""
    base = base_name(dataset)
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for pred, gts, length in zip(predictions, answers, lengths):
        s = score_prediction(pred, gts, DATASET2METRIC[base], all_classes, base in FIRST_LINE_DATASETS)
        buckets["0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"].append(s)
    return {k: round(100 * sum(v) / len(v), 2) if v else float("nan") for k, v in buckets.items()}


def longbench_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Official-style scores from runner records: per dataset, per category (mean of datasets), average."""
    by_ds: dict[str, list[float]] = {}
    for r in records:
        by_ds.setdefault(r["task"], []).append(r["score"])
    datasets = {d: round(100 * sum(v) / len(v), 2) for d, v in by_ds.items()}
    cats: dict[str, list[float]] = {}
    for d, s in datasets.items():
        cats.setdefault(DATASET2CATEGORY[base_name(d)], []).append(s)
    categories = {c: round(sum(v) / len(v), 2) for c, v in cats.items()}
    average = round(sum(datasets.values()) / len(datasets), 2) if datasets else float("nan")
    return {"datasets": datasets, "categories": categories, "average": average,
            "samples": {d: len(v) for d, v in by_ds.items()}}
