"""VQA v2 → `datasets`: one row per question, columns of `cmal_processing.schema.vqa_features`, and the answer
vocabulary saved beside the splits as `answer_vocab.json` (a JSON list; `answer_ids` index it).

Inputs are the official files: questions `{"questions": [{"image_id", "question", "question_id"}]}` and, except
for test splits, annotations `{"annotations": [{"question_id", "image_id", "question_type", "answer_type",
"multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}]}]}`.

**Answers** are normalised as the official evaluation script does (`normalize_answer`: its processPunctuation and
processDigitArticle). The vocabulary is the `top_k` most frequent normalised `multiple_choice_answer`s of the split
being built (ties: alphabetical), or a given one — build the training split first, then pass its
`answer_vocab.json` to the other splits (a folder refuses a second, different vocabulary).

**Soft scores.** Each answer of the vocabulary given by `n` of the 10 annotators scores `min(n / 3, 1)`, as the
project spec says (also UNITER's and LXMERT's `count / 3` practice). The official accuracy averages `min(matches / 3,
1)` over the 10 subsets of 9 annotators, which gives 0.3, 0.6, 0.9, 1.0 for n = 1, 2, 3, >= 4 where `n / 3` gives
0.33, 0.67, 1.0, 1.0. Questions whose answers all fall outside the vocabulary keep empty `answer_ids`.

Skip reasons: `malformed_record`, `empty_text`, `missing_annotation` (annotations given but none for the question),
`inconsistent_annotation` (its `image_id` differs from the question's), `bad_image_id`, `missing_features`,
`corrupt_features`.

    python -m cmal_processing build vqa --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --features train2014_obj36.tsv \\
        --image_id_format "COCO_train2014_{image_id:012d}" --split train --output DATA/vqa
    python -m cmal_processing build vqa --questions ..._val2014_questions.json \\
        --annotations ..._val2014_annotations.json \\
        --features val2014_obj36.tsv --image_id_format "COCO_val2014_{image_id:012d}" \\
        --answer_vocab DATA/vqa/answer_vocab.json --split validation --output DATA/vqa
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from .builders import (
    BuildSummary,
    SkipItem,
    check_image_id_format,
    collect_items,
    format_image_id,
    read_json,
    record_id,
    require_fields,
    text_field,
    write_split,
)
from .readers import PathLike, TagVocab
from .schema import ANSWER_VOCAB_FILE, vqa_features
from .skips import SkipCounter

__all__ = [
    "answer_soft_scores",
    "build_answer_vocab",
    "build_vqa",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
]

DEFAULT_TOP_K = 3129  # the answer vocabulary size of LXMERT and UNITER on VQA v2

# The official evaluation script's tables (VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py), reproduced;
# entries that map a word to itself ("let's", "she's") are left out.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern `(?!<=\d)(\.)(?!\d)` opens with a look-ahead (a typo for a look-behind) that always holds
# at a period, so it removes every period not followed by a digit ...
PERIOD = re.compile(r"\.(?!\d)")
# ... and it passes `re.UNICODE` (32) where `re.sub` takes `count`: at most 32 periods go.
OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official processPunctuation: each mark of `PUNCTUATION` is deleted when the answer has it next to a
    space (or has a comma between digits, "1,000"), else replaced by a space; periods not before a digit go."""
    strip_marks = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if strip_marks or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, count=OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower case, number words → digits, articles dropped, contractions
    restored ("dont" → "don't"), single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it: "Two" → "2", "a dog." → "dog", "dont" → "don't"."""
    return process_digit_article(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def build_answer_vocab(annotations: Iterable[dict], top_k: int = DEFAULT_TOP_K) -> list[str]:
    """The `top_k` most frequent normalised `multiple_choice_answer`s (ties alphabetical; empty answers left out)."""
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    counts = Counter(
        normalize_answer(annotation["multiple_choice_answer"])
        for annotation in annotations
        if isinstance(annotation, dict) and isinstance(annotation.get("multiple_choice_answer"), str)
    )
    counts.pop("", None)
    return [answer for answer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top_k]]


def answer_soft_scores(answers: Iterable[str], answer_index: dict[str, int]) -> tuple[list[int], list[float]]:
    """`(answer_ids, scores)` of one question: every vocabulary answer among the (raw) human `answers`, by id,
    with score `min(n / 3, 1)` for `n` annotators giving it after normalisation."""
    counts = Counter(normalize_answer(answer) for answer in answers)
    scored = sorted((answer_index[answer], min(count / 3.0, 1.0)) for answer, count in counts.items()
                    if answer in answer_index)
    return [answer_id for answer_id, _ in scored], [score for _, score in scored]


def _load_answer_vocab(answer_vocab: PathLike | Sequence[str]) -> list[str]:
    if isinstance(answer_vocab, (str, os.PathLike)):
        answers = read_json(answer_vocab, "answer_vocab")
    else:
        answers = list(answer_vocab)
    if not isinstance(answers, list) or not answers or not all(isinstance(answer, str) for answer in answers):
        raise ValueError(f"answer_vocab must be a non-empty JSON list of strings, got {str(answer_vocab)[:80]!r}")
    if len(set(answers)) != len(answers):
        raise ValueError(f"answer_vocab {str(answer_vocab)[:80]!r} lists some answers twice")
    return answers


def build_vqa(
    questions: PathLike,
    region_features: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    split: str,
    annotations: PathLike | None = None,
    answer_vocab: PathLike | Sequence[str] | None = None,
    top_k: int = DEFAULT_TOP_K,
    image_id_format: str = "{image_id}",
    # From here on write_split's keywords, spelled out in every builder's signature on purpose (its documentation).
    tag_vocab: TagVocab = None,
    id_offset: int = 0,
    num_shards: int = 1,
    shard_index: int = 0,
    lexicon=None,
    progress: bool = True,
) -> BuildSummary:
    """Write one VQA v2 split and `answer_vocab.json`; returns the `BuildSummary`.

    Args:
        questions: the official questions JSON.
        annotations: the official annotations JSON; None for a test split (rows then have no answers).
        answer_vocab: a JSON list file or a list of answers; None: the `top_k` answers of `annotations`.
        image_id_format: question's COCO `image_id` → feature image id, e.g. `"COCO_val2014_{image_id:012d}"`.
        region_features, output, split, tag_vocab, id_offset, num_shards, shard_index, lexicon, progress: see
            `cmal_processing.builders.write_split`.
    """
    template = check_image_id_format(image_id_format, ("image_id",))
    question_records = read_json(questions, "questions", list_keys=("questions",))["questions"]
    annotation_by_question = None
    if annotations is not None:
        annotation_list = read_json(annotations, "annotations", list_keys=("annotations",))["annotations"]
        annotation_by_question = {
            annotation["question_id"]: annotation
            for annotation in annotation_list
            if isinstance(annotation, dict) and isinstance(annotation.get("question_id"), (int, str))
        }
    if answer_vocab is not None:
        answers = _load_answer_vocab(answer_vocab)
    elif annotation_by_question is not None:
        answers = build_answer_vocab(annotation_by_question.values(), top_k)
    else:
        raise ValueError("answer_vocab is required when annotations is None (a test split): pass the training "
                         f"split's {ANSWER_VOCAB_FILE}")
    answer_index = {answer: answer_id for answer_id, answer in enumerate(answers)}
    refused = SkipCounter("skipped items")

    def make_item(record):
        record = require_fields(record, ("image_id", "question", "question_id"))
        item = {"question_id": str(record["question_id"]), "text": text_field(record["question"]),
                "question_type": "", "answer_ids": [], "answer_scores": []}
        if annotation_by_question is not None:
            annotation = annotation_by_question.get(record_id(record, "question_id"))
            if annotation is None:
                raise SkipItem("missing_annotation", f"no annotation for question_id {record['question_id']!r}")
            require_fields(annotation, ("image_id", "answers"))
            if not isinstance(annotation["answers"], list):
                raise SkipItem("malformed_record", f"annotation 'answers' is a {type(annotation['answers']).__name__}"
                               ", expected a list")
            if annotation["image_id"] != record["image_id"]:
                raise SkipItem("inconsistent_annotation", f"annotation image_id {annotation['image_id']!r} differs "
                               f"from the question's {record['image_id']!r}")
            human_answers = [a["answer"] for a in annotation["answers"] if isinstance(a, dict) and "answer" in a]
            item["question_type"] = str(annotation.get("question_type", ""))
            item["answer_ids"], item["answer_scores"] = answer_soft_scores(human_answers, answer_index)
        return (format_image_id(template, image_id=record["image_id"]),), item

    records = ((f"{Path(questions).name} question {record.get('question_id') if isinstance(record, dict) else index}",
                record) for index, record in enumerate(question_records))
    groups = collect_items(records, make_item, refused)
    statistics = {"answer vocabulary": len(answers)}
    if annotation_by_question is not None:
        statistics["rows without an answer in the vocabulary"] = 0

    def task_columns(item, regions):
        if annotation_by_question is not None and not item["answer_ids"]:
            statistics["rows without an answer in the vocabulary"] += 1
        return {name: item[name] for name in ("question_id", "text", "question_type", "answer_ids", "answer_scores")}

    return write_split(
        task="vqa",
        groups=groups,
        task_columns=task_columns,
        features=vqa_features,
        refused=refused,
        region_features=region_features,
        output=output,
        split=split,
        statistics=statistics,
        extra_files={ANSWER_VOCAB_FILE: json.dumps(answers, ensure_ascii=False)},
        tag_vocab=tag_vocab,
        id_offset=id_offset,
        num_shards=num_shards,
        shard_index=shard_index,
        lexicon=lexicon,
        progress=progress,
    )
