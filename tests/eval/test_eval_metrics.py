"""LongBench v1 metrics against values computed by hand (arithmetic in the comments)."""

from __future__ import annotations

import jieba
import pytest
from rouge import Rouge

from eval import metrics
from eval.metrics import (
    classification_score,
    code_sim_score,
    count_score,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    sample_score,
)


def rouge_f(precision: float, recall: float) -> float:
    """The `rouge` package's F: 2PR / (P + R + 1e-8)."""
    return 2.0 * precision * recall / (precision + recall + 1e-8)


# ------------------------------------------------------------------------------------ qa_f1


def test_qa_f1_normalizes_case_punctuation_and_articles():
    # pred -> "eiffel tower paris" (3 tokens), gold -> "eiffel tower" (2): overlap 2
    # P = 2/3, R = 2/2 = 1, F1 = 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3) = 0.8
    assert qa_f1_score("The Eiffel Tower, Paris.", "Eiffel Tower") == pytest.approx(0.8)


def test_qa_f1_counts_repeated_tokens_once_per_occurrence():
    # Counter(cat:2, dog:1) & Counter(cat:1, dog:2) = cat:1, dog:1 -> overlap 2
    # P = 2/3, R = 2/3, F1 = 2/3
    assert qa_f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)


def test_qa_f1_without_overlap_is_zero():
    assert qa_f1_score("London", "Paris") == 0
    # only articles and punctuation: both normalize to nothing -> no overlap -> 0
    assert qa_f1_score("The.", "a") == 0


def test_qa_f1_zh_segments_with_jieba_and_drops_punctuation():
    assert list(jieba.cut("答案是北京。", cut_all=False)) == ["答案", "是", "北京", "。"]
    # "。" normalizes to "" and is dropped: pred tokens [答案, 是, 北京], gold [北京]
    # overlap 1, P = 1/3, R = 1, F1 = 2 * (1/3) / (4/3) = 0.5
    assert qa_f1_zh_score("答案是北京。", "北京") == pytest.approx(0.5)
    # jieba: [北京, ！]; the full-width "！" is removed and dropped -> [北京] vs [北京] -> 1.0
    assert qa_f1_zh_score("北京！", "北京") == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ rouge


def test_rouge_l_uses_unique_words_and_union_lcs():
    # one sentence each (no "."); unique words: hyp {the, cat, sat, on, mat} = 5,
    # ref {the, cat, is, on, mat} = 5; LCS = the cat on the mat -> as a set {the, cat, on, mat} = 4
    # R = 4/5, P = 4/5, F = 2 * 0.64 / (1.6 + 1e-8)
    assert rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(rouge_f(0.8, 0.8), abs=1e-12)


def test_rouge_is_case_sensitive_and_splits_sentences_on_periods():
    # hyp sentences ["Rain falls", " Sun shines"] -> words {Rain, falls, Sun, shines} = 4
    # ref "rain falls" -> {rain, falls} = 2; LCS with sentence 1 = {falls} (case differs for Rain)
    # R = 1/2, P = 1/4, F = 2 * (1/8) / (3/4 + 1e-8)
    assert rouge_score("Rain falls. Sun shines", "rain falls") == pytest.approx(rouge_f(0.25, 0.5), abs=1e-12)


def test_rouge_exceptions_score_zero():
    assert rouge_score("", "Tom is late.") == 0.0  # rouge raises "Hypothesis is empty."
    assert rouge_score("...", "Tom is late.") == 0.0  # only periods: no sentences left


def test_rouge_recursion_error_scores_zero_whatever_the_process_recursion_limit():
    import sys

    long_text = " ".join(f"w{i}" for i in range(1100))
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # CPython's default, what the official eval.py runs with
    try:
        with pytest.raises(RecursionError):  # the package's recursive LCS reconstruction
            Rouge().get_scores([long_text], [long_text], avg=True)
    finally:
        sys.setrecursionlimit(previous)
    sys.setrecursionlimit(5000)  # as after importing torch / SGLang
    try:
        assert rouge_score(long_text, long_text) == 0.0  # identical, yet 0 as upstream
        assert sys.getrecursionlimit() == 5000  # restored
    finally:
        sys.setrecursionlimit(previous)
    short_text = " ".join(f"w{i}" for i in range(50))
    assert rouge_score(short_text, short_text) == pytest.approx(rouge_f(1.0, 1.0), abs=1e-12)


def test_rouge_zh_joins_jieba_tokens_with_spaces():
    assert list(jieba.cut("我爱北京")) == ["我", "爱", "北京"]
    assert list(jieba.cut("我爱上海")) == ["我", "爱", "上海"]
    # "我 爱 北京" vs "我 爱 上海": 3 unique words each, LCS {我, 爱} = 2 -> P = R = 2/3
    assert rouge_zh_score("我爱北京", "我爱上海") == pytest.approx(rouge_f(2 / 3, 2 / 3), abs=1e-12)


# --------------------------------------------------------------------------- classification


def test_classification_single_match_scores_one():
    assert classification_score("Location", "Location", all_classes=["Location", "Date"]) == 1.0


def test_classification_splits_credit_between_matched_classes():
    # both "Date" and "Number" occur in the prediction, neither inside the gold "Date"
    # except Date itself -> [Date, Number] -> 1/2
    assert classification_score("Number or Date", "Date", all_classes=["Date", "Number"]) == 0.5


def test_classification_gold_not_mentioned_scores_zero():
    assert classification_score("Number", "Date", all_classes=["Date", "Number"]) == 0.0


def test_classification_keeps_the_mutate_while_iterating_quirk():
    # matched = [A, AB, ABC, B] (all occur in "ABC"). Upstream removes while iterating:
    #   index 0: "A"   is inside gold "ABC" and != gold -> removed -> [AB, ABC, B]
    #   index 1: "ABC" == gold, kept        (the shift made the loop skip "AB")
    #   index 2: "B"   inside gold, != gold -> removed -> [AB, ABC]
    # gold survives with one other class -> 1/2. A correct filter would give 1/1.
    assert classification_score("ABC", "ABC", all_classes=["A", "AB", "ABC", "B"]) == 0.5


# ------------------------------------------------------------------------- retrieval, count


def test_retrieval_score_is_share_of_numbers_equal_to_paragraph_id():
    # gold id 12; numbers in the prediction: [12, 3] -> 1/2
    assert retrieval_score("Paragraph 12 and Paragraph 3", "Paragraph 12") == 0.5
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval_score("I do not know", "Paragraph 12") == 0.0  # no numbers
    # "120" is a different number, not a prefix match: [120] -> 0
    assert retrieval_score("Paragraph 120", "Paragraph 12") == 0.0


def test_retrieval_zh_score():
    # gold id 5; numbers [5, 15] -> 1/2
    assert retrieval_zh_score("答案是段落5，不是段落15", "段落5") == 0.5


def test_count_score():
    # gold "7"; numbers [7, 10] -> 1/2
    assert count_score("There are 7 unique paragraphs out of 10.", "7") == 0.5
    assert count_score("3", "3") == 1.0
    assert count_score("three", "3") == 0.0


# ----------------------------------------------------------------------------------- code_sim


def test_code_sim_takes_first_line_without_fence_or_comment():
    # lines: "```python" (fence), "# add them" (comment), "    return a + b" <- taken
    prediction = "\n```python\n# add them\n    return a + b\n```"
    assert code_sim_score(prediction, "    return a + b") == 1.0


def test_code_sim_uses_difflib_ratio_rounded_half_to_even():
    # difflib: 2 * matches / total = 2 * 7 / 16 = 0.875 -> fuzz.ratio = int(round(87.5)) = 88
    assert code_sim_score("return y", "return x") == 0.88
    # "// TODO" is skipped; "    return a + b" vs "return a + b": 2 * 12 / 28 = 0.857 -> 86
    assert code_sim_score("// TODO\n    return a + b", "return a + b") == 0.86


def test_code_sim_without_usable_line_compares_empty_string():
    assert code_sim_score("# only a comment", "return x") == 0.0


# ------------------------------------------------------------------------------- sample score


def test_sample_score_takes_max_over_golds():
    # "the lighthouse keeper": norm "lighthouse keeper", pred "old lighthouse keeper":
    # P = 2/3, R = 1 -> 0.8; "Mara" -> 0; max = 0.8
    answers = ["Mara", "the lighthouse keeper"]
    assert sample_score("narrativeqa", "The old lighthouse keeper", answers, None) == pytest.approx(0.8)


def test_sample_score_cuts_few_shot_predictions_to_first_line():
    # trec: "\n\nLocation\nDate" -> lstrip("\n") -> first line "Location"
    classes = ["Location", "Date"]
    assert sample_score("trec", "\n\nLocation\nDate", ["Location"], classes) == 1.0
    # narrativeqa is not cut: both lines count -> pred tokens [paris, london], gold [paris] -> 2/3
    assert sample_score("narrativeqa", "Paris\nLondon", ["Paris"], None) == pytest.approx(2 / 3)


def test_dataset_to_metric_matches_the_spec_table():
    expected = {
        "qa_f1_score": ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"],
        "qa_f1_zh_score": ["multifieldqa_zh"],
        "rouge_score": ["gov_report", "qmsum", "multi_news", "samsum"],
        "rouge_zh_score": ["dureader", "vcsum"],
        "classification_score": ["trec", "lsht"],
        "count_score": ["passage_count"],
        "retrieval_score": ["passage_retrieval_en"],
        "retrieval_zh_score": ["passage_retrieval_zh"],
        "code_sim_score": ["lcc", "repobench-p"],
    }
    actual: dict[str, list[str]] = {}
    for dataset, metric in metrics.DATASET_TO_METRIC.items():
        actual.setdefault(metric.__name__, []).append(dataset)
    assert {name: sorted(names) for name, names in actual.items()} == {
        name: sorted(names) for name, names in expected.items()
    }
