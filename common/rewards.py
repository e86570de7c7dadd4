"""Rewards for QoQ-Med style responses: label accuracy, box IoU and format.

A response is expected to look like::

    <think> reasoning </think>
    ```json
    [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]
    ```
    \\boxed{label 1, label 2}

The total reward is the weighted sum of Sec. 3.4 of the QoQ-Med paper (arXiv
2506.00711), ``r = w_acc * r_acc + w_iou * r_iou + w_fmt * r_fmt`` with the paper's
weights (0.6, 0.2, 0.2), divided by the sum of the weights so that it stays in [0, 1].
Every function here is pure: strings, boxes and masks in, floats out.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

Box = tuple[float, float, float, float]
"""An axis-aligned box ``(x1, y1, x2, y2)`` with ``x1 <= x2`` and ``y1 <= y2``."""

IouReduce = Literal["matched", "max", "mean"]
NoTarget = Literal["redistribute", "zero"]

_BOXED_OPEN = "\\boxed{"
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
# Separators between labels of a multi-label answer: ", ", " and ", " & " and the bare
# "," and "&" forms (surrounding whitespace is stripped from each label afterwards).
_LABEL_SEPARATOR = re.compile(r"(,|&|\s+and\s+)", re.IGNORECASE)
# The first fenced block tagged json; the tag is matched case-insensitively.
_JSON_FENCE = re.compile(r"```json[ \t]*\r?\n?(.*?)```", re.DOTALL | re.IGNORECASE)


# ---------------------------------------------------------------------------
# Answer extraction and label accuracy
# ---------------------------------------------------------------------------


def _last_boxed(text: str) -> tuple[int, str] | None:
    """Start index and content of the last top-level ``\\boxed{...}``, or None."""
    last: tuple[int, str] | None = None
    pos = 0
    while (start := text.find(_BOXED_OPEN, pos)) >= 0:
        i = start + len(_BOXED_OPEN)
        depth = 1
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth:
            # This box runs to the end of the text, so it is the last one and it
            # is unbalanced.
            return None
        last = (start, text[start + len(_BOXED_OPEN) : i - 1])
        pos = i
    return last


def extract_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` in ``text``.

    Braces inside the box may nest (``\\boxed{a_{1}}`` gives ``"a_{1}"``). A box
    nested in another box belongs to the outer one's content.

    Parameters
    ----------
    text : str
        A model response.

    Returns
    -------
    str or None
        The raw content (not stripped) of the last top-level box; None when the text
        has no ``\\boxed{`` or when the last one is never closed.
    """
    found = _last_boxed(text)
    return None if found is None else found[1]


def _normalise_label(label: str) -> str:
    return " ".join(label.split()).casefold()


def _label_key(label: str) -> tuple[str, ...]:
    """A label's pieces and separators, normalised: "A,B" and "a , b" have one key.

    (A separator " AND " normalises to "and", ", " to ",".)
    """
    return tuple(_normalise_label(p) for p in _LABEL_SEPARATOR.split(label))


def split_labels(answer: str, *, known: Iterable[str] = ()) -> frozenset[str]:
    """Split an answer into a set of normalised labels, whole known labels first.

    Separators are ``","``, ``"&"`` and ``" and "`` (any surrounding whitespace, any
    case). Before splitting, runs of pieces that together spell a ``known`` label
    (an option of the question, or a true label) are kept whole, longest run first,
    left to right: with the option "Actinic keratoses and intraepithelial carcinoma"
    known, that answer is one label, not two. Each label is case-folded, stripped and
    has its internal whitespace collapsed to single spaces; empty labels are dropped.

    Parameters
    ----------
    answer : str
        The content of a ``\\boxed{}`` or a ground-truth answer string.
    known : iterable of str
        Labels that must not be split (compared after the same normalisation).

    Returns
    -------
    frozenset of str
        The normalised labels, order-independent.
    """
    whole = {_label_key(k): _normalise_label(k) for k in known if _normalise_label(k)}
    longest = max((len(k) + 1) // 2 for k in whole) if whole else 1  # in pieces
    key = _label_key(answer)
    n = (len(key) + 1) // 2  # pieces at even positions of `key`, separators at odd
    labels: list[str] = []
    i = 0
    while i < n:
        # The longest run of pieces i..j-1 that spells a known label, else piece i alone.
        end = next(
            (j for j in range(min(n, i + longest), i + 1, -1) if key[2 * i : 2 * j - 1] in whole),
            i + 1,
        )
        run = key[2 * i : 2 * end - 1]
        labels.append(whole.get(run, run[0]))
        i = end
    return frozenset(label for label in labels if label)


def true_label_set(true_labels: str | Iterable[str], *, options: Iterable[str] = ()) -> frozenset[str]:
    """The normalised ground-truth labels.

    A string is split with :func:`split_labels` (CLIMB joins multi-label answers with
    ``", "``), keeping whole any ``options``; an iterable is taken as the labels
    themselves, each normalised like :func:`split_labels` does (never split).
    """
    if isinstance(true_labels, str):
        return split_labels(true_labels, known=options)
    if not isinstance(true_labels, Iterable):
        raise TypeError(
            "true_labels must be a string or an iterable of strings, "
            f"got {true_labels!r}"
        )
    labels = list(true_labels)
    for label in labels:
        if not isinstance(label, str):
            raise TypeError(
                f"true_labels must be a string or an iterable of strings, got an item "
                f"{label!r} of type {type(label).__name__}"
            )
    return frozenset(n for n in (_normalise_label(label) for label in labels) if n)


def predicted_labels(
    response: str, truth: frozenset[str], *, options: Iterable[str] = ()
) -> frozenset[str] | None:
    """The labels of a response's last ``\\boxed{}``; None when it has no (balanced) box.

    Whole options and whole true labels are matched before the answer is split (see
    :func:`split_labels`), so a compound option such as "Actinic keratoses and
    intraepithelial carcinoma" is one label. The reward (:func:`accuracy_reward`) and
    the evaluation metrics (client.trainer) both read the prediction through here.
    """
    answer = extract_boxed(response)
    if answer is None:
        return None
    return split_labels(answer, known=(*options, *truth))


def set_f1(predicted: frozenset[str], true: frozenset[str]) -> float:
    """F1 between two label sets: ``2 |P & T| / (|P| + |T|)``.

    Two empty sets are equal and score 1.0; exactly one empty set scores 0.0.
    """
    if not predicted and not true:
        return 1.0
    return 2.0 * len(predicted & true) / (len(predicted) + len(true))


def accuracy_reward(
    response: str, true_labels: str | Iterable[str], *, options: Iterable[str] = ()
) -> float:
    """Set-F1 between the labels in the last ``\\boxed{}`` and the true labels.

    Parameters
    ----------
    response : str
        A model response.
    true_labels : str or iterable of str
        The ground truth, see :func:`true_label_set`.
    options : iterable of str
        The question's options. An answer that spells a whole option (or a whole true
        label) counts as that one label even when it contains ``" and "``, ``","`` or
        ``"&"``; only the rest is split into several labels.

    Returns
    -------
    float
        In [0, 1]. 0 when the response has no (balanced) box. Matching ignores order,
        case and whitespace. If both sets are empty the score is 1.0 (the sets are
        equal); CLIMB answers are never empty, so this only matters for malformed
        ground truth.
    """
    truth = true_label_set(true_labels, options=options)
    predicted = predicted_labels(response, truth, options=options)
    return 0.0 if predicted is None else set_f1(predicted, truth)


# ---------------------------------------------------------------------------
# Boxes and IoU
# ---------------------------------------------------------------------------


def _as_box(value: object) -> Box | None:
    """An ordered box from a JSON value; None unless it is 4 finite numbers."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    coords: list[float] = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        f = float(v)
        if not math.isfinite(f):
            return None
        coords.append(f)
    x1, y1, x2, y2 = coords
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _json_fence(response: str) -> str | None:
    """Content of the first ```json fenced block, or None when there is none."""
    match = _JSON_FENCE.search(response)
    return None if match is None else match.group(1)


def _first_json_list(text: str) -> list[object] | None:
    """The first JSON list in ``text`` that holds at least one object, or None."""
    decoder = json.JSONDecoder()
    pos = 0
    while (start := text.find("[", pos)) >= 0:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        if isinstance(value, list) and any(isinstance(item, dict) for item in value):
            return value
        pos = start + 1
    return None


def parse_boxes(response: str) -> list[Box]:
    """Predicted boxes of a response, in the order they appear.

    The boxes come from the first ```json fenced block when there is one, otherwise
    from the first bare JSON list (in the whole text) that contains at least one
    object. Items must be objects with a ``"bbox_2d"`` of 4 finite numbers
    ``[x1, y1, x2, y2]``; other items are skipped. Coordinates are swapped where
    needed so that ``x1 <= x2`` and ``y1 <= y2``.

    Parameters
    ----------
    response : str
        A model response.

    Returns
    -------
    list of Box
        Possibly empty (no list, JSON that does not parse, no valid item).
    """
    fence = _json_fence(response)
    items = _first_json_list(fence if fence is not None else response)
    if items is None:
        return []
    boxes: list[Box] = []
    for item in items:
        if isinstance(item, dict):
            box = _as_box(item.get("bbox_2d"))
            if box is not None:
                boxes.append(box)
    return boxes


def _ordered(box: Sequence[float]) -> Box:
    ordered = _as_box(list(box))
    if ordered is None:
        raise ValueError(
            f"a box must be 4 finite numbers [x1, y1, x2, y2], got {box!r}"
        )
    return ordered


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes in continuous coordinates.

    Parameters
    ----------
    a, b : sequence of 4 floats
        ``(x1, y1, x2, y2)``; unordered corners are swapped first.

    Returns
    -------
    float
        In [0, 1]; 0 when the union has zero area (both boxes degenerate).
    """
    ax1, ay1, ax2, ay2 = _ordered(a)
    bx1, by1, bx2, by2 = _ordered(b)
    overlap_x = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    overlap_y = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = overlap_x * overlap_y
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Half-open pixel index range whose centres ``i + 0.5`` lie in ``[lo, hi)``."""
    start = min(max(math.ceil(lo - 0.5), 0), size)
    stop = min(max(math.ceil(hi - 0.5), 0), size)
    return start, max(start, stop)


def box_mask_iou(box: Sequence[float], mask: np.ndarray) -> float:
    """IoU between a box and a segmentation mask, counted in pixels.

    Pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``; it belongs to
    the box when its centre ``(col + 0.5, row + 0.5)`` lies in
    ``[x1, x2) x [y1, y2)``. The box is clipped to the mask's extent, so an integer
    box ``[2, 1, 5, 3]`` covers columns 2..4 and rows 1..2.

    Parameters
    ----------
    box : sequence of 4 floats
        ``(x1, y1, x2, y2)`` in pixel coordinates of ``mask`` (x = column).
    mask : numpy.ndarray, shape (H, W)
        The target; non-zero cells are foreground.

    Returns
    -------
    float
        ``|box & mask| / |box | mask|`` in [0, 1]; 0 when both are empty.
    """
    grid = np.asarray(mask)
    if grid.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {grid.shape}")
    if grid.dtype != np.bool_:
        grid = grid != 0
    x1, y1, x2, y2 = _ordered(box)
    height, width = grid.shape
    c0, c1 = _pixel_span(x1, x2, width)
    r0, r1 = _pixel_span(y1, y2, height)
    inter = int(grid[r0:r1, c0:c1].sum())
    union = (r1 - r0) * (c1 - c0) + int(grid.sum()) - inter
    return inter / union if union > 0 else 0.0


def matched_iou(iou: np.ndarray) -> float:
    """One-to-one matched IoU: sum of matched IoUs over ``max(#predicted, #targets)``.

    Predicted and target boxes are paired one to one so that the summed IoU is largest
    (the Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``). Dividing by
    the larger count charges every unmatched box: an extra predicted box and a missed
    target each cost as much as a matched box with IoU 0. Three predictions for one
    target score at most 1/3; one of two targets found exactly scores 1/2.

    Parameters
    ----------
    iou : numpy.ndarray, shape (P, T)
        IoU of every predicted box (rows) with every target (columns).

    Returns
    -------
    float
        In [0, 1]; 0 when either side is empty.
    """
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2:
        raise ValueError(f"iou must be a (predicted, targets) matrix, got shape {iou.shape}")
    if iou.size == 0:
        return 0.0
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum()) / max(iou.shape)


def iou_reward(
    pred_boxes: Sequence[Sequence[float]],
    *,
    target_boxes: Sequence[Sequence[float]] | None = None,
    target_mask: np.ndarray | None = None,
    reduce: IouReduce = "matched",
) -> float | None:
    """Localisation reward of a response's boxes.

    With ``reduce="matched"`` (the default) predicted boxes and targets are matched one
    to one, see :func:`matched_iou`; a segmentation mask is one target. ``"max"`` and
    ``"mean"`` instead give each predicted box its IoU with the mask, or its best IoU
    over the target boxes, and reduce over the predicted boxes: ``"max"`` (paper, Sec.
    3.4) rewards adding boxes (one right box among any number of wrong ones scores 1),
    ``"mean"`` (released code) never rewards finding a second target.

    Parameters
    ----------
    pred_boxes : sequence of boxes
        Boxes from :func:`parse_boxes`.
    target_boxes : sequence of boxes, optional
        Ground-truth boxes in the same coordinates.
    target_mask : numpy.ndarray, shape (H, W), optional
        Ground-truth segmentation; takes precedence over ``target_boxes`` when both
        are given (as the released code does).
    reduce : {"matched", "max", "mean"}
        How the per-box IoUs become one number.

    Returns
    -------
    float or None
        None when the sample has no localisation target (no mask and no target box);
        0.0 when it has one but no box was predicted; otherwise in [0, 1].
    """
    if reduce not in ("matched", "max", "mean"):
        raise ValueError(f"reduce must be 'matched', 'max' or 'mean', got {reduce!r}")
    if target_mask is None and not target_boxes:
        return None
    if not pred_boxes:
        return 0.0
    if target_mask is not None:
        iou = np.array([[box_mask_iou(box, target_mask)] for box in pred_boxes])
    else:
        targets = list(target_boxes or ())
        iou = np.array([[box_iou(box, t) for t in targets] for box in pred_boxes])
    if reduce == "matched":
        return matched_iou(iou)
    per_box = iou.max(axis=1)  # (P,): each predicted box's best target
    return float(per_box.max() if reduce == "max" else per_box.mean())


# ---------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------


def _think_well_formed(response: str, answer_start: int | None) -> bool:
    """One ``<think>``, one ``</think>`` after it, and both before the answer box."""
    if response.count(_THINK_OPEN) != 1 or response.count(_THINK_CLOSE) != 1:
        return False
    close = response.index(_THINK_CLOSE)
    if response.index(_THINK_OPEN) > close:
        return False
    return answer_start is None or close < answer_start


def _item_complete(item: object) -> bool:
    if not isinstance(item, dict) or _as_box(item.get("bbox_2d")) is None:
        return False
    label = item.get("label")
    return isinstance(label, str) and bool(label.strip())


def format_reward(
    response: str,
    *,
    expect_boxes: bool,
    think_weight: float = 0.25,
    answer_weight: float = 0.25,
    fence_weight: float = 0.10,
    parse_weight: float = 0.10,
    list_weight: float = 0.10,
    items_weight: float = 0.20,
) -> float:
    """Graded format reward in [0, 1].

    The score is ``sum(weight_i * check_i) / sum(weight_i)`` over the checks that
    apply. Always:

    - think: exactly one ``<think>`` and one ``</think>``, in that order, and
      ``</think>`` before the last ``\\boxed{``;
    - answer: the last ``\\boxed{}`` is balanced, has non-blank content and, when the
      response has a ``</think>``, comes after it.

    Only when ``expect_boxes`` (the JSON checks form a chain; each needs the one
    before it):

    - fence: a ```json fenced block is present;
    - parse: its content parses as JSON (strict, no Python-literal fallback);
    - list: the parsed value is a list;
    - items: the fraction of list items that have a valid ``bbox_2d`` (4 finite
      numbers) and a non-blank string ``label`` (0 for an empty list).

    With the default weights the JSON part is worth half the score when boxes are
    expected (0.25 + 0.25 for think and answer, 0.1 + 0.1 + 0.1 + 0.2 for the
    fence, parse, list and items checks); when they are not, think and answer are
    worth 0.5 each. The grading of the JSON part follows the released code's
    format reward; the paper's (binary, "every label has a box") is not used.

    Parameters
    ----------
    response : str
        A model response.
    expect_boxes : bool
        Whether the prompt asks for bounding boxes.
    think_weight, answer_weight : float
        Weights of the think and answer checks.
    fence_weight, parse_weight, list_weight, items_weight : float
        Weights of the JSON checks. All weights must be >= 0, and those that
        apply must not all be zero.

    Returns
    -------
    float
        The weighted fraction of checks passed.
    """
    weights = {
        "think_weight": think_weight,
        "answer_weight": answer_weight,
        "fence_weight": fence_weight,
        "parse_weight": parse_weight,
        "list_weight": list_weight,
        "items_weight": items_weight,
    }
    for name, value in weights.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    boxed = _last_boxed(response)
    answer_start = None if boxed is None else boxed[0]
    think_ok = _think_well_formed(response, answer_start)
    answer_ok = (
        boxed is not None
        and bool(boxed[1].strip())
        and boxed[0] > response.rfind(_THINK_CLOSE)  # rfind is -1 without </think>
    )
    score = think_weight * think_ok + answer_weight * answer_ok
    total = think_weight + answer_weight
    if expect_boxes:
        total += fence_weight + parse_weight + list_weight + items_weight
        score += _json_format_score(
            response,
            fence_weight=fence_weight,
            parse_weight=parse_weight,
            list_weight=list_weight,
            items_weight=items_weight,
        )
    if total <= 0:
        raise ValueError(
            f"format weights that apply (expect_boxes={expect_boxes}) sum to {total}; "
            "give at least one of them a positive value"
        )
    return score / total


def _json_format_score(
    response: str,
    *,
    fence_weight: float,
    parse_weight: float,
    list_weight: float,
    items_weight: float,
) -> float:
    """Weighted (unnormalised) score of the JSON checks of :func:`format_reward`."""
    fence = _json_fence(response)
    if fence is None:
        return 0.0
    try:
        value = json.loads(fence)
    except ValueError:
        return fence_weight
    if not isinstance(value, list):
        return fence_weight + parse_weight
    complete = sum(_item_complete(item) for item in value)
    fraction = complete / len(value) if value else 0.0
    return fence_weight + parse_weight + list_weight + items_weight * fraction


# ---------------------------------------------------------------------------
# Total
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the three reward terms (QoQ-Med paper defaults, Sec. 3.4).

    Attributes
    ----------
    accuracy : float
        Weight of the set-F1 accuracy term (0.6).
    iou : float
        Weight of the box IoU term (0.2).
    format : float
        Weight of the format term (0.2).
    """

    accuracy: float = 0.6
    iou: float = 0.2
    format: float = 0.2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"RewardWeights.{f.name} must be a number, got {value!r}"
                )
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"RewardWeights.{f.name} must be finite and >= 0, got {value!r}"
                )
        if self.accuracy + self.iou + self.format <= 0:
            raise ValueError(
                f"RewardWeights must not all be zero, got accuracy={self.accuracy}, "
                f"iou={self.iou}, format={self.format}"
            )


@dataclass(frozen=True)
class RewardBreakdown:
    """The reward terms of one response and their weighted total.

    Attributes
    ----------
    accuracy : float
        Set-F1 accuracy in [0, 1].
    iou : float or None
        Box IoU in [0, 1]; None when the sample has no localisation target.
    format : float
        Format score in [0, 1].
    total : float
        Weighted total in [0, 1].
    predicted : frozenset of str or None
        The answer's labels as the accuracy term read them (None: no balanced box).
        Evaluation metrics count these, so they and the reward agree on every answer.
    truth : frozenset of str
        The normalised true labels the accuracy term compared with.
    """

    accuracy: float
    iou: float | None
    format: float
    total: float
    predicted: frozenset[str] | None = None
    truth: frozenset[str] = frozenset()


def total_reward(
    response: str,
    *,
    true_labels: str | Iterable[str],
    options: Iterable[str] = (),
    target_boxes: Sequence[Sequence[float]] | None = None,
    target_mask: np.ndarray | None = None,
    expect_boxes: bool = False,
    weights: RewardWeights = RewardWeights(),
    iou_reduce: IouReduce = "matched",
    no_target: NoTarget = "redistribute",
) -> RewardBreakdown:
    """Weighted reward of one response.

    ``total = (w_acc * acc + w_iou * iou + w_fmt * fmt) / (w_acc + w_iou + w_fmt)``;
    with the default weights the denominator is 1. When the sample has no
    localisation target (``iou`` is None):

    - ``"redistribute"``: the IoU weight is shared between accuracy and format in
      proportion to their weights, i.e. ``total = (w_acc * acc + w_fmt * fmt) /
      (w_acc + w_fmt)`` (0.6/0.2 become 0.75/0.25). If ``w_acc + w_fmt`` is 0 the
      total is 0.
    - ``"zero"``: the IoU term counts as 0.

    Parameters
    ----------
    response : str
        A model response.
    true_labels : str or iterable of str
        Ground truth, see :func:`accuracy_reward`.
    options : iterable of str
        The question's options, matched whole first, see :func:`accuracy_reward`.
    target_boxes, target_mask
        Localisation target, see :func:`iou_reward`.
    expect_boxes : bool
        Passed to :func:`format_reward`.
    weights : RewardWeights
        Term weights.
    iou_reduce : {"matched", "max", "mean"}
        Passed to :func:`iou_reward`.
    no_target : {"redistribute", "zero"}
        What the IoU weight does when the sample has no target.

    Returns
    -------
    RewardBreakdown
        The three terms and the total.
    """
    if no_target not in ("redistribute", "zero"):
        raise ValueError(
            f"no_target must be 'redistribute' or 'zero', got {no_target!r}"
        )
    truth = true_label_set(true_labels, options=options)
    predicted = predicted_labels(response, truth, options=options)
    accuracy = 0.0 if predicted is None else set_f1(predicted, truth)
    iou = iou_reward(
        parse_boxes(response),
        target_boxes=target_boxes,
        target_mask=target_mask,
        reduce=iou_reduce,
    )
    fmt = format_reward(response, expect_boxes=expect_boxes)
    weighted = weights.accuracy * accuracy + weights.format * fmt
    weight_sum = weights.accuracy + weights.iou + weights.format
    if iou is not None:
        total = (weighted + weights.iou * iou) / weight_sum
    elif no_target == "zero":
        total = weighted / weight_sum
    else:
        kept = weights.accuracy + weights.format
        total = weighted / kept if kept > 0 else 0.0
    return RewardBreakdown(
        accuracy=accuracy, iou=iou, format=fmt, total=total, predicted=predicted, truth=truth
    )
