"""`fedclimb evaluate`: per-domain metrics with their baselines, and review PNGs."""

from __future__ import annotations

import json

import pytest

from common.climb.records import load_records
from common.config import load_config, to_yaml
from common.evaluation import label_key
from common.modeling.lora import init_adapter
from common.modeling.shapes import adapter_shapes_for
from common.rewards import true_label_set
from server.checkpoint import save_round
from server.federation import base_for_adapters
from simulation.cli import main
from simulation.evaluate import choose_explained
from simulation.synth import generate_federation


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    generate_federation(tmp / "data", hospitals=1, seed=0, scale=0.25)
    cfg = load_config(overrides=[f"model.cache_dir={tmp / 'cache'}"])
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    base = base_for_adapters(cfg, run)
    save_round(run, 1, init_adapter(adapter_shapes_for(cfg.model, cfg.lora), seed=3, b_std=0.05), {"strategy": {}},
               lora=cfg.lora, base_model_name=base)
    return tmp, run, tmp / "data" / "hospital-0"


def test_evaluate_a_run_directory_writes_metrics_baselines_and_explanations(setup, capsys):
    tmp, run, data = setup
    out = tmp / "out"
    assert main(["evaluate", "--adapter", str(run), "--data", str(data), "--out", str(out), "--explain", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / "evaluation.json").read_text())
    assert printed["overall"] == result["overall"]
    test = load_records(data, "test")
    assert result["overall"]["records"] == len(test) == len(result["records"])
    domains = result["domains"]
    assert set(domains) == {r.domain for r in test}
    for d, rep in domains.items():
        n = sum(1 for r in test if r.domain == d)
        assert rep["records"] == n
        assert sum(sum(row.values()) for row in rep["confusion"].values()) == n
        assert 0.0 <= rep["balanced_accuracy"] <= 1.0
        assert rep["constant"]["answer"] and rep["base_model"] is not None
    worst = min(domains, key=lambda d: (domains[d]["balanced_accuracy"], d))
    assert result["overall"]["worst_domain"] == worst
    # five PNGs spread over five domains, linked from the markdown
    pngs = sorted((out / "explanations").glob("*.png"))
    assert len(pngs) == 5 and len({p.name.split("_annotation")[0] for p in pngs}) == 5
    md = (out / "evaluation.md").read_text()
    assert f"Worst domain: {worst}" in md and all(p.name in md for p in pngs)
    assert all(p.stat().st_size > 10_000 for p in pngs)
    # Answer probabilities for the two-answer domains (and only those), for the adapter and the base.
    two = {d for d in domains if all(len(r.options) == 2 for r in test if r.domain == d)}
    assert two  # (every synthetic domain asks a two-answer question)
    for d, rep in domains.items():
        if d not in two:
            assert rep["option_scores"] is None
            continue
        scores, base = rep["option_scores"], rep["base_option_scores"]
        assert scores["records"] == base["records"] == rep["records"]
        assert set(scores["mean_score"]) <= set(scores["labels"]) and len(scores["labels"]) == 2
        assert scores["auc"] is None or 0.0 <= scores["auc"] <= 1.0
        assert scores["mean_score"] != base["mean_score"]  # the adapter (B != 0) moves the probabilities
    assert "## Answer probabilities" in md and all(f"| {d} | log p(" in md for d in two)


def test_evaluate_without_adapter_is_the_base_model_alone(setup):
    tmp, run, data = setup
    out = tmp / "base-only"
    assert main(["evaluate", "--data", str(data), "--out", str(out), f"model.cache_dir={tmp / 'cache'}"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["meta"]["adapter"] is None
    assert all(rep["base_model"] is None for rep in result["domains"].values())


def test_evaluate_refuses_unknown_records_and_missing_data(setup, tmp_path):
    tmp, run, data = setup
    assert main(["evaluate", "--adapter", str(run), "--data", str(tmp_path / "nope")]) == 2
    assert main(["evaluate", "--adapter", str(run), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--records", "no/such.jsonl:1"]) == 2


def test_choose_explained_spreads_over_domains_in_file_order(setup):
    _, _, data = setup
    records = load_records(data, "test")
    chosen = choose_explained(records, 7)
    domains = sorted({r.domain for r in records})
    assert [r.domain for r in chosen[: len(domains)]] == domains
    assert len(chosen) == 7
    first = {d: next(r for r in records if r.domain == d) for d in domains}
    assert all(chosen[i] == first[d] for i, d in enumerate(domains))
    ids = [records[3].id, records[0].id]
    assert [r.id for r in choose_explained(records, 0, ids)] == ids


def test_simulate_report_links_review_pngs_of_every_domain(setup):
    from simulation.explain import explain_run, hospital_roots, link_in_report

    tmp, run, data = setup
    cfg = load_config(str(run / "config.yaml"))
    folder = run / "hospitals" / "hospital-0"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hospital.yaml").write_text(f"name: hospital-0\ndata_root: {data}\nstate_dir: {folder / 'state'}\n"
                                          "privacy:\n  planned_rounds: 3\n")
    assert hospital_roots(run) == [data]
    pngs = explain_run(run, cfg, hospital_roots(run), per_domain=2)
    domains = {r.domain for r in load_records(data, "test")}
    assert len(pngs) == 2 * len(domains)
    assert all(p.parent == run / "explanations" and p.stat().st_size > 10_000 for p in pngs)
    report = run / "report.md"
    report.write_text("# report\n")
    link_in_report(report, pngs)
    text = report.read_text()
    assert all(f"(explanations/{p.name})" in text for p in pngs)


def test_evaluate_calibrate_reads_answers_with_the_option_prior_removed(setup):
    tmp, run, data = setup
    out = tmp / "calibrated"
    assert main(["evaluate", "--adapter", str(run), "--data", str(data), "--out", str(out), "--calibrate", "valid"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["meta"]["calibrate"] == "valid"
    valid = load_records(data, "valid")
    for d, rep in result["domains"].items():
        for key in ("calibrated", "base_calibrated"):
            cal = rep[key]
            assert cal["prior_records"] == sum(1 for r in valid if r.domain == d)
            assert sum(sum(row.values()) for row in cal["confusion"].values()) == rep["records"]
            assert cal["balanced_accuracy"] == pytest.approx(sum(cal["recalls"].values()) / len(cal["recalls"]))
            assert set(cal["offsets"]) == {label_key(true_label_set(o, options=r.options))
                                           for r in valid if r.domain == d for o in r.options}
        # The adapter (B != 0) moves the option prior away from the base model's.
        assert rep["calibrated"]["offsets"] != rep["base_calibrated"]["offsets"]
        # Each record carries both calibrated answers (for paired comparisons); they add up to the confusion.
        mine = [r for r in result["records"] if r["domain"] == d]
        for key, answer in (("calibrated", "calibrated_answer"), ("base_calibrated", "base_calibrated_answer")):
            counted: dict[str, dict[str, int]] = {}
            for r in mine:
                row = counted.setdefault(r["truth"], {})
                row[r[answer]] = row.get(r[answer], 0) + 1
            assert counted == rep[key]["confusion"]
    assert "## Calibrated answers (option priors from split `valid`)" in (out / "evaluation.md").read_text()
    # Refused: the evaluated split itself, and unconstrained answers (no probabilities to read).
    assert main(["evaluate", "--adapter", str(run), "--data", str(data), "--out", str(tmp / "x"),
                 "--calibrate", "test"]) == 2
    assert main(["evaluate", "--adapter", str(run), "--data", str(data), "--out", str(tmp / "y"),
                 "--calibrate", "valid", "prompt.constrained=false"]) == 2
