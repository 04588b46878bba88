"""LongBench v1 metrics, reimplemented to behave exactly like the official `LongBench/metrics.py`
and the scorer of `LongBench/eval.py` (see /work/shared/research/eval-spec.md, section 1.5).

Quirks kept on purpose because published numbers depend on them: the mutate-while-iterating
loop in `classification_score`, ROUGE from PyPI `rouge==1.0.1` with any exception scored 0
(its recursive LCS raises RecursionError past ~1000 tokens), and fuzzywuzzy's `fuzz.ratio`.
"""

from __future__ import annotations

import re
import sys
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import jieba
from rouge import Rouge

# We deliberately run fuzzywuzzy without python-Levenshtein: its pure-Python difflib fallback is
# the backend our numbers use (the two backends give different ratios). Silence the
# "slow pure-python SequenceMatcher" warning that choice triggers on import.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using slow pure-python SequenceMatcher")
    from fuzzywuzzy import fuzz

jieba.setLogLevel(60)  # jieba logs its dictionary loading at INFO on first use

# Full-width and CJK punctuation removed by the official `normalize_zh_answer`.
CJK_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ZH_PUNCTUATION = frozenset(string.punctuation + CJK_PUNCTUATION)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop English articles, collapse whitespace."""
    lowered = text.lower()
    without_punctuation = "".join(ch for ch in lowered if ch not in _ASCII_PUNCTUATION)
    without_articles = re.sub(r"\b(a|an|the)\b", " ", without_punctuation)
    return " ".join(without_articles.split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and CJK punctuation, drop all whitespace."""
    lowered = text.lower()
    without_punctuation = "".join(ch for ch in lowered if ch not in _ZH_PUNCTUATION)
    return "".join(without_punctuation.split())


def token_f1(prediction_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    overlap = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    normalized = (normalize_zh_answer(token) for token in jieba.cut(text, cut_all=False))
    return [token for token in normalized if len(token) > 0]


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    return token_f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


# The official eval.py runs with CPython's default recursion limit, where rouge 1.0.1's
# recursive LCS raises RecursionError past ~1000 tokens (scored 0). Importing SGLang or
# torch raises the limit, which would silently change those scores; pin it while scoring.
_OFFICIAL_RECURSION_LIMIT = 1000


def rouge_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """ROUGE-L F of `rouge` 1.0.1; any exception (empty text, RecursionError) scores 0."""
    previous_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_OFFICIAL_RECURSION_LIMIT)
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:
        return 0.0
    finally:
        sys.setrecursionlimit(previous_limit)
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    prediction = " ".join(jieba.cut(prediction, cut_all=False))
    ground_truth = " ".join(jieba.cut(ground_truth, cut_all=False))
    return rouge_score(prediction, ground_truth)


def classification_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    all_classes: Sequence[str] = kwargs["all_classes"]  # type: ignore[assignment]
    matched = [class_name for class_name in all_classes if class_name in prediction]
    # Official quirk, kept literally: removing from the list being iterated skips the element
    # after each removal, so some classes that are substrings of the gold survive.
    for class_name in matched:
        if class_name in ground_truth and class_name != ground_truth:
            matched.remove(class_name)
    if ground_truth in matched:
        return 1.0 / len(matched)
    return 0.0


def _share_of_numbers_equal_to(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return float(sum(1 for number in numbers if number == target) / len(numbers))


def retrieval_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    paragraph_id = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    return _share_of_numbers_equal_to(prediction, paragraph_id)


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    paragraph_id = re.findall(r"段落(\d+)", ground_truth)[0]
    return _share_of_numbers_equal_to(prediction, paragraph_id)


def count_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    return _share_of_numbers_equal_to(prediction, str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """fuzz.ratio of the first generated line that is not a comment or a markdown fence."""
    first_code_line = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_code_line = line
            break
    return fuzz.ratio(first_code_line, ground_truth) / 100


Metric = Callable[..., float]

DATASET_TO_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# Few-shot datasets whose prediction is cut to its first non-empty line before scoring.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def sample_score(
    dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None
) -> float:
    """Score of one prediction as in `eval.py`: max over all gold answers, floored at 0."""
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET_TO_METRIC[dataset]
    score = 0.0
    for ground_truth in answers:
        score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
    return score
