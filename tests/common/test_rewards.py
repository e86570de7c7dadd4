"""Tests of common.rewards against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from common.rewards import (
    RewardBreakdown,
    RewardWeights,
    accuracy_reward,
    box_iou,
    box_mask_iou,
    extract_boxed,
    format_reward,
    iou_reward,
    parse_boxes,
    split_labels,
    total_reward,
    true_label_set,
)

FENCE = "```"

# A complete response: think block, a json fence with two labelled boxes, an answer.
FULL = (
    "<think>Blunted costophrenic angle on the left.</think>\n"
    f"{FENCE}json\n"
    '[{"bbox_2d": [0, 0, 2, 2], "label": "effusion"},'
    ' {"bbox_2d": [10, 10, 12, 12], "label": "edema"}]\n'
    f"{FENCE}\n"
    "\\boxed{Effusion, Edema}"
)


# ---------------------------------------------------------------------------
# extract_boxed
# ---------------------------------------------------------------------------


def test_extract_boxed_returns_content_of_the_only_box():
    assert extract_boxed("so the answer is \\boxed{Nevus}.") == "Nevus"


def test_extract_boxed_takes_the_last_box():
    assert extract_boxed("\\boxed{draft} then \\boxed{final}") == "final"


def test_extract_boxed_keeps_nested_braces():
    assert extract_boxed("\\boxed{a_{1} and {b}}") == "a_{1} and {b}"


def test_extract_boxed_nested_box_belongs_to_the_outer_box():
    assert extract_boxed("\\boxed{x \\boxed{y}}") == "x \\boxed{y}"


def test_extract_boxed_without_box_is_none():
    assert extract_boxed("the answer is Nevus") is None


def test_extract_boxed_unbalanced_last_box_is_none():
    assert extract_boxed("\\boxed{ok} and then \\boxed{broken") is None


def test_extract_boxed_empty_box_is_empty_string():
    assert extract_boxed("\\boxed{}") == ""


# ---------------------------------------------------------------------------
# split_labels
# ---------------------------------------------------------------------------


def test_split_labels_all_separators():
    answer = "Pleural Effusion, Edema and Atelectasis & Nodule,Mass&Cardiomegaly"
    assert split_labels(answer) == frozenset(
        {"pleural effusion", "edema", "atelectasis", "nodule", "mass", "cardiomegaly"}
    )


def test_split_labels_normalises_case_and_whitespace_and_drops_empties():
    assert split_labels("  NO \t  Finding ,, & ") == frozenset({"no finding"})


def test_split_labels_does_not_split_inside_words():
    # "and" inside "Band" / "Grand" is not a separator: it needs whitespace around it.
    assert split_labels("Grand Band AND Brand") == frozenset({"grand band", "brand"})


# ---------------------------------------------------------------------------
# accuracy_reward
# ---------------------------------------------------------------------------


def test_accuracy_exact_match_ignores_order_case_and_spaces():
    response = "\\boxed{edema ,  PLEURAL   effusion}"
    assert accuracy_reward(response, "Pleural Effusion, Edema") == 1.0


def test_accuracy_partial_overlap_is_set_f1():
    # P = {a, b}, T = {a, c}: 2 * |{a}| / (2 + 2) = 2 / 4 = 0.5
    assert accuracy_reward("\\boxed{a, b}", "a, c") == pytest.approx(0.5)


def test_accuracy_subset_prediction():
    # P = {a}, T = {a, b, c}: 2 * 1 / (1 + 3) = 0.5
    assert accuracy_reward("\\boxed{A}", ["a", "b", "c"]) == pytest.approx(0.5)


def test_accuracy_superset_prediction():
    # P = {a, b, c, d}, T = {a, b}: 2 * 2 / (4 + 2) = 4 / 6
    assert accuracy_reward("\\boxed{a, b, c, d}", "a and b") == pytest.approx(4 / 6)


def test_accuracy_uses_the_last_box():
    assert accuracy_reward("\\boxed{wrong} ... \\boxed{Nevus}", "Nevus") == 1.0


def test_accuracy_without_box_is_zero():
    assert accuracy_reward("Nevus", "Nevus") == 0.0


def test_accuracy_wrong_label_is_zero():
    assert accuracy_reward("\\boxed{Melanoma}", "Nevus") == 0.0


def test_accuracy_empty_box_against_nonempty_truth_is_zero():
    assert accuracy_reward("\\boxed{ }", "Nevus") == 0.0


def test_accuracy_both_empty_is_one():
    # Documented edge case: two empty label sets are equal.
    assert accuracy_reward("\\boxed{}", "") == 1.0


# A CLIMB (ISIC/HAM10000) option whose text contains the separator " and ".
AKIEC = "Actinic keratoses and intraepithelial carcinoma"
SKIN_OPTIONS = (AKIEC, "Melanoma", "Melanocytic nevi", "Benign keratosis-like lesions")


def test_accuracy_correct_compound_answer_scores_one():
    """The truth label is kept whole; the same answer in the box must not be split."""
    assert accuracy_reward(f"\\boxed{{{AKIEC}}}", (AKIEC,)) == 1.0
    assert accuracy_reward(f"\\boxed{{{AKIEC.upper()}}}", (AKIEC,), options=SKIN_OPTIONS) == 1.0


def test_accuracy_compound_option_is_matched_whole_before_splitting():
    # P = {akiec, melanoma} (the option is one label), T = {melanoma}: 2 * 1 / 3
    got = accuracy_reward(f"\\boxed{{{AKIEC}, Melanoma}}", ("Melanoma",), options=SKIN_OPTIONS)
    assert got == pytest.approx(2 / 3)
    # A wrong compound option is one wrong label, not a half-right pair.
    assert accuracy_reward(f"\\boxed{{{AKIEC}}}", ("Actinic keratoses",), options=SKIN_OPTIONS) == 0.0


def test_split_labels_keeps_known_labels_whole_and_splits_the_rest():
    got = split_labels("melanoma & ACTINIC keratoses  and intraepithelial carcinoma and x, y", known=SKIN_OPTIONS)
    assert got == frozenset({"melanoma", AKIEC.casefold(), "x", "y"})
    # separators inside a known label are compared normalised: "A,B" spells "A, B"
    assert split_labels("Nevus,benign", known=["Nevus, benign"]) == frozenset({"nevus, benign"})


def test_string_truth_keeps_whole_options():
    assert true_label_set(AKIEC, options=SKIN_OPTIONS) == frozenset({AKIEC.casefold()})
    assert true_label_set(f"{AKIEC}, Melanoma", options=SKIN_OPTIONS) == frozenset({AKIEC.casefold(), "melanoma"})


def test_total_reward_reports_the_labels_it_scored():
    got = total_reward(f"\\boxed{{{AKIEC}}}", true_labels=(AKIEC,), options=SKIN_OPTIONS)
    assert got.accuracy == 1.0
    assert got.predicted == got.truth == frozenset({AKIEC.casefold()})
    assert total_reward("no box", true_labels=(AKIEC,)).predicted is None


def test_accuracy_rejects_non_string_labels():
    with pytest.raises(TypeError, match="true_labels"):
        accuracy_reward("\\boxed{a}", ["a", 3])


# ---------------------------------------------------------------------------
# parse_boxes
# ---------------------------------------------------------------------------


def test_parse_boxes_from_fence_skips_malformed_items_and_orders_corners():
    response = (
        "<think>[1, 2, 3, 4] is not a box list</think>"
        f"{FENCE}json\n"
        '[{"bbox_2d": [5, 6, 1, 2], "label": "a"},'
        ' {"bbox_2d": [1, 2, 3], "label": "three numbers"},'
        ' {"bbox_2d": ["1", 2, 3, 4]},'
        ' {"bbox_2d": [true, 2, 3, 4]},'
        ' {"box": [1, 2, 3, 4]},'
        ' "not an object",'
        ' {"bbox_2d": [0.5, 1, 2.5, 3]}]\n'
        f"{FENCE}\\boxed{{a}}"
    )
    # [5, 6, 1, 2] is swapped to (1, 2, 5, 6); the next five items are malformed.
    assert parse_boxes(response) == [(1.0, 2.0, 5.0, 6.0), (0.5, 1.0, 2.5, 3.0)]


def test_parse_boxes_prefers_the_fence_over_an_earlier_bare_list():
    response = (
        '<think>draft: [{"bbox_2d": [9, 9, 10, 10]}]</think>'
        f'{FENCE}json\n[{{"bbox_2d": [0, 0, 4, 4], "label": "a"}}]\n{FENCE}'
    )
    assert parse_boxes(response) == [(0.0, 0.0, 4.0, 4.0)]


def test_parse_boxes_falls_back_to_first_bare_list_of_objects():
    response = (
        'boxes: [1, 2] then [{"bbox_2d": [0, 0, 4, 4]}] and [{"bbox_2d": [1, 1, 2, 2]}]'
    )
    assert parse_boxes(response) == [(0.0, 0.0, 4.0, 4.0)]


def test_parse_boxes_bad_json_in_fence_gives_no_boxes():
    response = f'{FENCE}json\n[{{"bbox_2d": [0, 0, 4, 4],]\n{FENCE}'
    assert parse_boxes(response) == []


def test_parse_boxes_without_any_list_is_empty():
    assert parse_boxes("<think>x</think>\\boxed{a}") == []


# ---------------------------------------------------------------------------
# box_iou and box_mask_iou
# ---------------------------------------------------------------------------


def test_box_iou_partial_overlap():
    # inter = [1,2]x[1,2] = 1; union = 4 + 4 - 1 = 7
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


def test_box_iou_identical_disjoint_and_unordered():
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    # (2, 2, 0, 0) is the same box as (0, 0, 2, 2) once its corners are ordered.
    assert box_iou((2, 2, 0, 0), (0, 0, 2, 2)) == 1.0


def test_box_iou_degenerate_boxes_is_zero():
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0


def test_box_iou_rejects_wrong_length():
    with pytest.raises(ValueError, match="4 finite numbers"):
        box_iou((0, 0, 1), (0, 0, 1, 1))


@pytest.fixture
def mask() -> np.ndarray:
    # 4 rows x 6 columns; foreground = rows 1..2, columns 2..4 (6 cells).
    m = np.zeros((4, 6), dtype=bool)
    m[1:3, 2:5] = True
    return m


def test_box_mask_iou_exact_box(mask):
    # x in [2, 5) -> columns 2, 3, 4; y in [1, 3) -> rows 1, 2: the mask exactly.
    assert box_mask_iou((2, 1, 5, 3), mask) == 1.0


def test_box_mask_iou_whole_image(mask):
    # box = 24 cells, inter = 6, union = 24 -> 6 / 24
    assert box_mask_iou((0, 0, 6, 4), mask) == pytest.approx(0.25)


def test_box_mask_iou_clips_box_to_mask(mask):
    # (4, -5, 100, 100) clipped -> columns 4, 5 and rows 0..3 = 8 cells;
    # inter = column 4, rows 1..2 = 2 cells; union = 8 + 6 - 2 = 12 -> 2 / 12
    assert box_mask_iou((4, -5, 100, 100), mask) == pytest.approx(1 / 6)


def test_box_mask_iou_uses_pixel_centres(mask):
    # x1 = 2.4 <= 2.5 (centre of column 2) and 4.5 < x2 = 4.6: columns 2..4 -> exact.
    assert box_mask_iou((2.4, 1, 4.6, 3), mask) == 1.0
    # x1 = 2.6 > 2.5 drops column 2: box 2 x 2 = 4 cells, inter 4, union 4 + 6 - 4 = 6
    assert box_mask_iou((2.6, 1, 4.6, 3), mask) == pytest.approx(4 / 6)


def test_box_mask_iou_accepts_integer_masks(mask):
    as_uint8 = mask.astype(np.uint8) * 255
    assert box_mask_iou((0, 0, 6, 4), as_uint8) == pytest.approx(0.25)


def test_box_mask_iou_box_outside_image_is_zero(mask):
    assert box_mask_iou((10, 10, 20, 20), mask) == 0.0


def test_box_mask_iou_rejects_3d_mask():
    with pytest.raises(ValueError, match="2-D"):
        box_mask_iou((0, 0, 1, 1), np.zeros((2, 2, 3), dtype=bool))


# ---------------------------------------------------------------------------
# iou_reward
# ---------------------------------------------------------------------------


def test_iou_reward_without_target_is_none():
    assert iou_reward([(0, 0, 1, 1)]) is None
    assert iou_reward([(0, 0, 1, 1)], target_boxes=[]) is None


def test_iou_reward_with_target_but_no_prediction_is_zero(mask):
    assert iou_reward([], target_boxes=[(0, 0, 1, 1)]) == 0.0
    assert iou_reward([], target_mask=mask) == 0.0


def test_iou_reward_several_targets_max_and_mean():
    preds = [(0, 0, 2, 2), (10, 10, 12, 12)]
    targets = [(0, 0, 2, 2), (10, 10, 14, 12)]
    # pred 1: best over targets = IoU with target 1 = 1.0
    # pred 2: vs target 1 = 0; vs target 2: inter 2x2 = 4, union 4 + 8 - 4 = 8 -> 0.5
    assert iou_reward(preds, target_boxes=targets, reduce="max") == pytest.approx(1.0)
    assert iou_reward(preds, target_boxes=targets, reduce="mean") == pytest.approx(0.75)
    # matched: pred 1 <-> target 1 (1.0), pred 2 <-> target 2 (0.5); (1.0 + 0.5) / 2
    assert iou_reward(preds, target_boxes=targets) == pytest.approx(0.75)


# The example: one target, one exact box and two boxes that each cover one
# corner cell of it: IoU (9, 9, 10, 10) vs (0, 0, 10, 10) = 1 / 100.
TARGET = (0, 0, 10, 10)
SPAM = [(0, 0, 10, 10), (9, 9, 10, 10), (0, 0, 1, 1)]


def test_iou_reward_spamming_boxes_is_not_rewarded():
    """max scored the 3-box spam 1.0 and mean (1 + 0.01 + 0.01) / 3 = 0.34; matched gives 1/3."""
    assert iou_reward(SPAM, target_boxes=[TARGET], reduce="max") == pytest.approx(1.0)
    assert iou_reward(SPAM, target_boxes=[TARGET], reduce="mean") == pytest.approx(0.34)
    # one match (IoU 1.0), two unmatched predictions: 1.0 / max(3, 1)
    assert iou_reward(SPAM, target_boxes=[TARGET]) == pytest.approx(1 / 3)


def test_matched_iou_exact_match_is_one():
    targets = [(0, 0, 2, 2), (5, 5, 9, 9)]
    assert iou_reward(list(reversed(targets)), target_boxes=targets) == pytest.approx(1.0)


def test_matched_iou_one_target_missing():
    # one of two targets found exactly: 1.0 / max(1, 2)
    assert iou_reward([(0, 0, 2, 2)], target_boxes=[(0, 0, 2, 2), (5, 5, 9, 9)]) == pytest.approx(0.5)


def test_matched_iou_one_extra_box():
    # the right box plus a disjoint one: 1.0 / max(2, 1)
    assert iou_reward([(0, 0, 2, 2), (5, 5, 9, 9)], target_boxes=[(0, 0, 2, 2)]) == pytest.approx(0.5)


def test_matched_iou_pairs_each_target_with_one_box():
    """Two boxes near target x: one is matched to x, the other only gets its IoU with y."""
    x, y = (0, 0, 4, 2), (4, 0, 8, 2)
    a, b = (0, 0, 3, 2), (1, 0, 6, 2)
    # IoU(a, x) = 6 / 8 = 3/4;  IoU(a, y) = 0
    # IoU(b, x) = 6 / (10 + 8 - 6) = 1/2;  IoU(b, y) = 4 / (10 + 8 - 4) = 2/7
    # best pairing a-x, b-y: (3/4 + 2/7) / 2 = 29/56 (b-x, a-y would give 1/4)
    assert iou_reward([b, a], target_boxes=[x, y]) == pytest.approx(29 / 56)


def test_matched_iou_mask_is_one_target(mask):
    # (0, 0, 6, 4) scores 0.25 against the mask; a second, disjoint box halves it.
    assert iou_reward([(0, 0, 6, 4)], target_mask=mask) == pytest.approx(0.25)
    assert iou_reward([(0, 0, 6, 4), (10, 10, 20, 20)], target_mask=mask) == pytest.approx(0.125)


def test_iou_reward_mask_takes_precedence_over_boxes(mask):
    # Against the mask the box (0, 0, 6, 4) scores 0.25; against the box target 1.0.
    got = iou_reward([(0, 0, 6, 4)], target_boxes=[(0, 0, 6, 4)], target_mask=mask)
    assert got == pytest.approx(0.25)


def test_iou_reward_rejects_unknown_reduce():
    with pytest.raises(ValueError, match="'median'"):
        iou_reward([(0, 0, 1, 1)], target_boxes=[(0, 0, 1, 1)], reduce="median")


# ---------------------------------------------------------------------------
# format_reward: default weights think 0.25, answer 0.25, fence 0.1, parse 0.1,
# list 0.1, items 0.2 (sum 1.0 with boxes; 0.5 without, so then think and answer
# are worth 0.25 / 0.5 = 0.5 each).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        pytest.param("", 0.0, id="empty"),
        # answer only: 0.25
        pytest.param("\\boxed{Edema}", 0.25, id="answer-only"),
        # think + answer: 0.25 + 0.25
        pytest.param("<think>r</think>\\boxed{Edema}", 0.5, id="think-answer"),
        # fence present, JSON does not parse: 0.25 + 0.25 + 0.1
        pytest.param(
            f'<think>r</think>{FENCE}json\n[{{"bbox_2d": [0, 0]\n'
            f"{FENCE}\\boxed{{Edema}}",
            0.6,
            id="think-answer-bad-json",
        ),
        # JSON parses but is an object, not a list: 0.25 + 0.25 + 0.1 + 0.1
        pytest.param(
            f'<think>r</think>{FENCE}json\n{{"bbox_2d": [0, 0, 1, 1]}}\n'
            f"{FENCE}\\boxed{{Edema}}",
            0.7,
            id="think-answer-json-object",
        ),
        # list with 1 of 2 complete items: 0.25 + 0.25 + 0.1 + 0.1 + 0.1 + 0.2 * 1/2
        pytest.param(
            f"<think>r</think>{FENCE}json\n"
            '[{"bbox_2d": [0, 0, 1, 1], "label": "a"}, {"bbox_2d": [0, 0, 1, 1]}]\n'
            f"{FENCE}\\boxed{{Edema}}",
            0.9,
            id="half-the-items-labelled",
        ),
        # everything: 0.25 + 0.25 + 0.1 + 0.1 + 0.1 + 0.2
        pytest.param(FULL, 1.0, id="full"),
    ],
)
def test_format_reward_ladder_with_boxes(response, expected):
    assert format_reward(response, expect_boxes=True) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        pytest.param("", 0.0, id="empty"),
        # answer only: 0.25 / 0.5
        pytest.param("\\boxed{Edema}", 0.5, id="answer-only"),
        # think only (no box at all): 0.25 / 0.5
        pytest.param("<think>r</think>", 0.5, id="think-only"),
        pytest.param("<think>r</think>\\boxed{Edema}", 1.0, id="think-answer"),
        # the JSON part does not count when boxes are not expected
        pytest.param(FULL, 1.0, id="full"),
    ],
)
def test_format_reward_ladder_without_boxes(response, expected):
    assert format_reward(response, expect_boxes=False) == pytest.approx(expected)


def test_format_reward_think_must_be_single_and_before_the_answer():
    # Two <think> tags: the think check fails, the answer check passes -> 0.5
    assert format_reward(
        "<think>a</think><think>b</think>\\boxed{x}", expect_boxes=False
    ) == pytest.approx(0.5)
    # Closing tag before opening tag: think fails; the box is after "</think>" -> 0.5
    got = format_reward("</think>r<think>\\boxed{x}", expect_boxes=False)
    assert got == pytest.approx(0.5)
    # Answer before the think block: both checks fail -> 0
    assert format_reward("\\boxed{x}<think>r</think>", expect_boxes=False) == 0.0


def test_format_reward_blank_answer_fails_the_answer_check():
    # think passes, "\boxed{  }" is blank -> 0.5
    got = format_reward("<think>r</think>\\boxed{  }", expect_boxes=False)
    assert got == pytest.approx(0.5)


def test_format_reward_custom_weights_are_normalised():
    # Only the think check weighs: think passes -> 2 / 2
    got = format_reward(
        "<think>r</think>",
        expect_boxes=True,
        think_weight=2.0,
        answer_weight=0.0,
        fence_weight=0.0,
        parse_weight=0.0,
        list_weight=0.0,
        items_weight=0.0,
    )
    assert got == pytest.approx(1.0)


def test_format_reward_rejects_negative_weight():
    with pytest.raises(ValueError, match="fence_weight"):
        format_reward("", expect_boxes=True, fence_weight=-0.1)


def test_format_reward_rejects_all_zero_weights():
    with pytest.raises(ValueError, match="sum to 0"):
        format_reward("", expect_boxes=False, think_weight=0.0, answer_weight=0.0)


# ---------------------------------------------------------------------------
# RewardWeights and total_reward
# ---------------------------------------------------------------------------


def test_reward_weights_defaults_are_the_papers():
    assert RewardWeights() == RewardWeights(accuracy=0.6, iou=0.2, format=0.2)


def test_reward_weights_rejects_negative_and_names_the_field():
    with pytest.raises(ValueError, match="RewardWeights.iou"):
        RewardWeights(iou=-0.2)


def test_reward_weights_rejects_all_zero():
    with pytest.raises(ValueError, match="all be zero"):
        RewardWeights(accuracy=0.0, iou=0.0, format=0.0)


def test_total_reward_with_box_target():
    # accuracy: P = {effusion, edema}, T = {effusion, nodule} -> 2 * 1 / 4 = 0.5
    # iou (matched): pred (0,0,2,2) vs (1,1,3,3) = 1/7, pred (10,10,12,12) unmatched
    #   -> (1/7) / max(2, 1) = 1/14
    # format: FULL = 1.0
    # total = 0.6 * 0.5 + 0.2 / 14 + 0.2 * 1.0
    got = total_reward(
        FULL,
        true_labels="Effusion, Nodule",
        target_boxes=[(1, 1, 3, 3)],
        expect_boxes=True,
    )
    assert got.accuracy == pytest.approx(0.5)
    assert got.iou == pytest.approx(1 / 14)
    assert got.format == pytest.approx(1.0)
    assert got.total == pytest.approx(0.3 + 0.2 / 14 + 0.2)


def test_total_reward_max_reduce():
    # iou (max): 1/7 and 0 -> 1/7; total = 0.3 + 0.2 / 7 + 0.2
    got = total_reward(
        FULL,
        true_labels="Effusion, Nodule",
        target_boxes=[(1, 1, 3, 3)],
        expect_boxes=True,
        iou_reduce="max",
    )
    assert got.total == pytest.approx(0.3 + 0.2 / 7 + 0.2)


def test_total_reward_mean_reduce():
    # iou (mean) = (1/7 + 0) / 2 = 1/14 -> total = 0.3 + 0.2 / 14 + 0.2
    got = total_reward(
        FULL,
        true_labels="Effusion, Nodule",
        target_boxes=[(1, 1, 3, 3)],
        expect_boxes=True,
        iou_reduce="mean",
    )
    assert got.total == pytest.approx(0.3 + 0.2 / 14 + 0.2)


def test_total_reward_without_target_redistributes():
    # accuracy 1.0, format ("answer only", no boxes expected) 0.5, iou None.
    # weights 0.6 / 0.2 become 0.75 / 0.25: 0.75 * 1.0 + 0.25 * 0.5 = 0.875
    got = total_reward("\\boxed{Nevus}", true_labels="Nevus")
    expected = RewardBreakdown(accuracy=1.0, iou=None, format=0.5, total=0.875)
    assert got.accuracy == expected.accuracy
    assert got.iou is None
    assert got.format == pytest.approx(expected.format)
    assert got.total == pytest.approx(expected.total)


def test_total_reward_without_target_zero():
    # 0.6 * 1.0 + 0.2 * 0 + 0.2 * 0.5 = 0.7
    got = total_reward("\\boxed{Nevus}", true_labels="Nevus", no_target="zero")
    assert got.total == pytest.approx(0.7)


def test_total_reward_normalises_by_the_weight_sum():
    # weights (1, 1, 2), sum 4; acc 1.0, iou 0 (target, no box), format 0.5:
    # (1 * 1.0 + 1 * 0 + 2 * 0.5) / 4 = 0.5
    got = total_reward(
        "\\boxed{Nevus}",
        true_labels="Nevus",
        target_boxes=[(0, 0, 1, 1)],
        weights=RewardWeights(accuracy=1.0, iou=1.0, format=2.0),
    )
    assert got.iou == 0.0
    assert got.total == pytest.approx(0.5)


def test_total_reward_redistribute_with_only_iou_weight_is_zero():
    got = total_reward(
        "\\boxed{Nevus}",
        true_labels="Nevus",
        weights=RewardWeights(accuracy=0.0, iou=1.0, format=0.0),
    )
    assert got.total == 0.0


def test_total_reward_rejects_unknown_no_target():
    with pytest.raises(ValueError, match="'drop'"):
        total_reward("\\boxed{a}", true_labels="a", no_target="drop")
