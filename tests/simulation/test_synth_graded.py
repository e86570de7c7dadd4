"""The learning benchmark's graded-rarity pool (simulation.synth_graded, `data synth --graded`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from common.climb.records import load_records
from common.climb.validate import validate_root
from simulation.cli import main
from simulation.synth_graded import PANELS, generate_graded, parse_shares, render_report, train_counts


def test_train_counts_by_largest_remainder() -> None:
    # 40/25/15/8/2 of 1000 (sum 90): 444.4, 277.8, 166.7, 88.9, 22.2 -> floors 444, 277, 166, 88, 22
    # (997); the three largest remainders (.89, .78, .67) get the last three records.
    assert train_counts((40, 25, 15, 8, 2), 1000) == [444, 278, 167, 89, 22]
    assert sum(train_counts((3, 1, 1, 1, 1), 70)) == 70
    assert train_counts((1000, 1, 1, 1, 1), 100)[1:] == [4, 4, 4, 4]  # the floor: 2 records per class


@pytest.mark.parametrize("text", ["40,25,15,8", "40,25,15,8,x", "40,25,15,8,0", "40,25,15,8,nan"])
def test_bad_shares_are_refused_with_the_domains_named(text: str) -> None:
    with pytest.raises(ValueError, match="--graded"):
        parse_shares(text)


def _flag(report: str, analyte_name: str) -> str:
    line = next(x for x in report.splitlines() if x.startswith(analyte_name + ":"))
    match = re.search(r"\((H|L)\)$", line)
    return match.group(1) if match else ""


def test_every_record_is_answered_by_its_own_analyte(tmp_path: Path) -> None:
    counts = generate_graded(tmp_path / "pool", train_records=200, eval_records=10, seed=3)
    report = validate_root(tmp_path / "pool")
    assert report.ok and report.valid == sum(sum(c.values()) for c in counts.values())
    for split in ("train", "valid", "test"):
        records = load_records(tmp_path / "pool", split)
        for panel in PANELS:
            mine = [r for r in records if r.domain == panel.key]
            assert len(mine) == counts[panel.key][split]
            positives = 0
            for r in mine:
                text = r.prompt
                assert panel.question in text and all(o in text for o in panel.options)
                positive = r.answers[0] == panel.options[1]
                positives += positive
                assert _flag(text, panel.analyte.name) == (panel.direction if positive else "")
                assert len(text.splitlines()) == 1 + len(PANELS) + 1 + 2  # header, analytes, question, options
            assert positives == len(mine) // 2  # every split balanced
    assert [counts[p.key]["train"] for p in PANELS] == train_counts((40, 25, 15, 8, 2), 200)
    assert all(c["test"] == 10 and c["valid"] == 5 for c in counts.values())


def test_no_two_answers_share_their_deciding_token() -> None:
    """Under constrained decoding an answer's first token decides it. If two domains' answers
    began with the same token, training one domain would move the other's answers (the
    first graded pool did this: "Normal sodium" and "Normal kidney function")."""
    from common.config import load_config
    from common.modeling.tokenizer import train_tiny_tokenizer

    cfg = load_config(overrides=["federation=benchmark"])
    assert cfg.prompt.constrained and cfg.model.source == "tiny"  # the benchmark's decoding and model
    tok = train_tiny_tokenizer(cfg.model.tiny.vocab_size)
    answers = [o for p in PANELS for o in p.options]
    first = {o: tok(o, add_special_tokens=False).input_ids[0] for o in answers}
    assert len(set(first.values())) == len(answers) == 2 * len(PANELS), {
        o: tok.decode([t]) for o, t in first.items()}


def test_the_other_analytes_are_abnormal_at_the_set_rate() -> None:
    rng = np.random.default_rng(0)
    panel = PANELS[0]
    reports = [render_report(rng, panel, 0, other_abnormal=0.3) for _ in range(2000)]
    flags = [bool(_flag(r, p.analyte.name)) for r in reports for p in PANELS[1:]]
    assert np.mean(flags) == pytest.approx(0.3, abs=0.02)
    assert not any(_flag(r, panel.analyte.name) for r in reports)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    def text(seed: int, name: str) -> str:
        generate_graded(tmp_path / name, train_records=60, eval_records=4, seed=seed)
        return (tmp_path / name / "lab" / "panel_sodium" / "annotation_train.jsonl").read_text()

    assert text(1, "a") == text(1, "b") != text(2, "c")


def test_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_graded(tmp_path, train_records=60)
    with pytest.raises(FileExistsError, match="refusing to delete"):
        generate_graded(tmp_path, train_records=60, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_writes_the_pool_and_names_bad_shares(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", str(tmp_path / "pool"), "--graded", "40,25,15,8,2", "--train-records", "100",
                 "--test-records", "6"]) == 0
    out = capsys.readouterr().out
    assert "panel_sodium: train 4 " in out and "simulation.data_root=" in out  # 2.2 of 100 -> the floor of 4
    manifest = json.loads((tmp_path / "pool" / "graded.json").read_text())
    assert manifest["shares"] == [40, 25, 15, 8, 2] and manifest["counts"]["panel_diabetes"]["test"] == 6
    assert main(["data", "synth", str(tmp_path / "other"), "--graded", "1,2"]) == 2
    assert "panel_diabetes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--graded", "40,25,15,8,2", "--hospitals", "4"], "--hospitals"),
    (["--graded", "40,25,15,8,2", "--scale", "2"], "--scale"),
    (["--train-records", "100"], "--train-records"),
])
def test_cli_refuses_options_of_the_other_kind_of_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        argv: list[str], named: str) -> None:
    """--graded writes one root (no hospitals); the synthetic federation has no record totals.
    An option the chosen pool ignores is refused by name, and nothing is written."""
    assert main(["data", "synth", str(tmp_path / "pool"), *argv]) == 2
    assert named in capsys.readouterr().err and not (tmp_path / "pool").exists()
