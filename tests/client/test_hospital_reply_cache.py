"""A round asked again with the same global adapter and instruction is re-sent, not charged again.

Through the ClientApp with a real (tiny) model and DP on: the second ask (a resumed run:
another Flower run id) gets the identical reply and the ledger gains nothing; another
adapter trains and is charged. Every reply lands in the audit log, re-sends flagged.
client/reply_cache.py's lock makes a redo wait for the computation in progress.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import reply_cache
from client.reply_cache import reply_key, reserved
from common import keys
from common.config import load_config
from common.modeling.lora import init_adapter
from common.wire import encode_adapter
from simulation.inprocess import enter_task


def _values(lr: float = 1e-5) -> dict[str, Any]:
    return {keys.SERVER_ROUND: 1, keys.SEED: 0, keys.PLANNED_ROUNDS: 1, keys.WIRE_PRECISION: "fp32",
            keys.ONLY_B: False, keys.DOMAIN_NAMES: [], keys.DOMAIN_COUNT: [], keys.DOMAIN_MEAN: [],
            "hp.train.lr": lr}


def _content(shapes: dict[str, tuple[int, ...]], *, adapter_seed: int = 0, lr: float = 1e-5) -> RecordDict:
    tensors = init_adapter(shapes, seed=adapter_seed, b_std=0.01)
    return RecordDict({keys.CONFIG: ConfigRecord(_values(lr)), keys.ARRAYS: encode_adapter(tensors, "fp32")})


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from client.runtime import RUNTIME
    from client.site import effective_config, resolve_site
    from common.modeling.lora import adapter_shapes
    from common.runconfig import config_from_run_config
    from simulation.synth import generate_federation

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("replycache")
    root = generate_federation(base / "fed", hospitals=1, seed=0, scale=0.25).hospital_roots[0]
    config = base / "hospital.yaml"
    config.write_text(
        f"name: h0\ndata_root: {root}\nstate_dir: {base / 'state'}\nmax_eval_records: 4\n"
        "privacy:\n  target_epsilon: 50.0\n  planned_rounds: 5\n  noise_multiplier: 1.0\n  secure_rng: false\n"
        "  eval_release: dp\n", encoding="utf-8")
    run_config = {"overrides": f"model.cache_dir={base / 'cache'} model.device=cpu train.steps=1 "
                               "rollout.batch_prompts=4 rollout.num_rollouts=2 rollout.max_new_tokens=8"}
    node_config = {"hospital-config": str(config)}
    site = resolve_site(node_config, run_config)
    shapes = adapter_shapes(RUNTIME.policy(effective_config(config_from_run_config(run_config), site, {})).peft)
    enter_task()
    return {"state": base / "state", "run_config": run_config, "node_config": node_config, "shapes": shapes,
            "config": config}


def _call(h: dict[str, Any], content: RecordDict, kind: str = "train", run_id: int = 1) -> Message:
    from client.client_app import app

    msg = Message(content, dst_node_id=1, message_type=kind, group_id="1")
    context = Context(run_id=run_id, node_id=1, node_config=h["node_config"], state=RecordDict(),
                      run_config=dict(h["run_config"]))
    return app(msg, context)


def _entries(state: Path) -> list[dict[str, Any]]:
    return json.loads((state / "privacy_ledger.json").read_text(encoding="utf-8"))["entries"]


def _audit(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text(encoding="utf-8").splitlines()]


def _arrays(reply: Message) -> dict[str, bytes]:
    return {name: arr.data for name, arr in reply.content.array_records[keys.ARRAYS].items()}


def test_same_adapter_and_instruction_is_resent_without_a_second_charge(
        hospital: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
    state = hospital["state"]
    first = _call(hospital, _content(hospital["shapes"]), run_id=1)
    assert first.content.metric_records[keys.METRICS][keys.STATUS] == keys.STATUS_OK
    charged = _entries(state)
    assert [e["kind"] for e in charged].count("dpsgd") == 1

    again = _call(hospital, _content(hospital["shapes"]), run_id=2)  # the resumed run: a new run id
    assert _entries(state) == charged, "re-sending a released reply must not charge the ledger"
    assert _arrays(again) == _arrays(first)
    assert dict(again.content.metric_records[keys.METRICS]) == dict(first.content.metric_records[keys.METRICS])

    audit = _audit(state)[-2:]
    assert [a["resent"] for a in audit] == [False, True]
    assert audit[0]["tensors"] == audit[1]["tensors"] and audit[0]["metrics"] == audit[1]["metrics"]
    assert audit[0]["status"] == "ok" and audit[0]["kind"] == "train" and audit[0]["round"] == 1
    names = {t["name"] for t in audit[0]["tensors"]}
    assert names == set(_arrays(first)) and all(t["shape"] for t in audit[0]["tensors"])
    assert audit[0]["bytes"] > 0 and keys.EPSILON in audit[0]["metrics"]
    err = capfd.readouterr().err
    assert "round 1 train: asked" in err and "(re-sent, already paid for)" in err and "epsilon spent" in err


def test_a_different_adapter_or_instruction_trains_and_charges(hospital: dict[str, Any]) -> None:
    state = hospital["state"]
    _call(hospital, _content(hospital["shapes"]))  # cached or computed: same key as above
    before = len(_entries(state))
    other = _call(hospital, _content(hospital["shapes"], adapter_seed=1))
    assert other.content.metric_records[keys.METRICS][keys.STATUS] == keys.STATUS_OK
    assert len(_entries(state)) == before + 1
    _call(hospital, _content(hospital["shapes"], lr=2e-5))  # same adapter, another learning rate
    assert len(_entries(state)) == before + 2
    assert _audit(state)[-1]["resent"] is False


def test_an_evaluation_asked_again_is_released_once(hospital: dict[str, Any]) -> None:
    state = hospital["state"]
    content = _content(hospital["shapes"], adapter_seed=7)
    content[keys.CONFIG][keys.DOMAIN_NAMES] = ["synth_cxr"]
    content[keys.CONFIG][keys.DOMAIN_COUNT] = [1.0]
    content[keys.CONFIG][keys.DOMAIN_MEAN] = [-1.0]
    first = _call(hospital, content, "evaluate")
    releases = [e["kind"] for e in _entries(state)].count("eval_release")
    assert releases >= 1 and first.content.metric_records[keys.METRICS][keys.STATUS] == keys.STATUS_OK
    again = _call(hospital, content, "evaluate", run_id=3)
    assert [e["kind"] for e in _entries(state)].count("eval_release") == releases
    assert dict(again.content.metric_records[keys.METRICS]) == dict(first.content.metric_records[keys.METRICS])


def test_a_redo_waits_for_the_computation_in_progress_then_resends(tmp_path: Path) -> None:
    key = "k" * 64
    stored = RecordDict({keys.METRICS: MetricRecord({keys.STATUS: 0, "x": 1.5})})
    seen: list[RecordDict | None] = []
    holding = threading.Event()

    def first() -> None:
        with reserved(tmp_path, key) as slot:
            holding.set()
            time.sleep(0.5)  # still training when the redo arrives
            slot.store(stored)

    def redo() -> None:
        holding.wait()
        with reserved(tmp_path, key) as slot:
            seen.append(slot.load())

    threads = [threading.Thread(target=first), threading.Thread(target=redo)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen and seen[0] is not None
    assert dict(seen[0].metric_records[keys.METRICS]) == {keys.STATUS: 0, "x": 1.5}


@pytest.mark.parametrize("release", ["exact", "none"])
def test_a_first_evaluation_opens_the_ledger_before_it_is_counted(
        hospital: dict[str, Any], tmp_path: Path, release: str, caplog: pytest.LogCaptureFixture) -> None:
    """A DP hospital whose first instruction is an evaluation: the ClientApp counts it in
    evaluations.json, and the ledger must exist before that file does, or the ledger's
    integrity check warns that privacy state exists without a ledger."""
    state = tmp_path / "state"
    config = tmp_path / "hospital.yaml"
    text = hospital["config"].read_text(encoding="utf-8")
    config.write_text(text.replace(f"state_dir: {hospital['state']}", f"state_dir: {state}")
                      .replace("eval_release: dp", f"eval_release: {release}"), encoding="utf-8")
    fresh = {**hospital, "node_config": {"hospital-config": str(config)}}
    with caplog.at_level("WARNING"):
        reply = _call(fresh, _content(hospital["shapes"], adapter_seed=11), "evaluate")
    assert reply.content.metric_records[keys.METRICS][keys.STATUS] == keys.STATUS_OK
    assert (state / "privacy_ledger.json").is_file() and _entries(state) == []  # created, nothing charged
    assert (state / "evaluations.json").is_file() == (release == "exact")  # withheld ones are not counted
    assert not [r for r in caplog.records if "privacy_ledger.json" in r.getMessage()]


def test_stored_replies_round_trip_and_only_the_last_few_are_kept(tmp_path: Path) -> None:
    raw = Array(dtype="bfloat16", shape=(2, 2), stype="raw", data=b"\x01\x02\x03\x04\x05\x06\x07\x08")
    content = RecordDict({keys.METRICS: MetricRecord({keys.STATUS: 0, "v": [1.0, 2.0]}),
                          keys.ARRAYS: ArrayRecord({"a": Array(torch.ones(3).numpy()), "b": raw})})
    for i in range(reply_cache.KEEP + 2):
        with reserved(tmp_path, f"{i:064d}") as slot:
            slot.store(content)
        time.sleep(0.01)
    kept = sorted(p.name for p in (tmp_path / reply_cache.CACHE_DIR).iterdir() if p.is_dir())
    assert kept == [f"{i:064d}" for i in range(2, reply_cache.KEEP + 2)]
    with reserved(tmp_path, f"{reply_cache.KEEP + 1:064d}") as slot:
        back = slot.load()
    assert back is not None
    assert [(n, a.dtype, a.shape, a.stype, a.data) for n, a in back[keys.ARRAYS].items()] == \
        [(n, a.dtype, a.shape, a.stype, a.data) for n, a in content[keys.ARRAYS].items()]
    assert dict(back[keys.METRICS]) == {keys.STATUS: 0, "v": [1.0, 2.0]}


def test_the_key_covers_adapter_values_instruction_and_configuration() -> None:
    cfg = load_config()
    adapter = {"a": torch.zeros(2, 2)}
    base = reply_key("train", _values(), adapter, cfg)
    assert base == reply_key("train", dict(reversed(list(_values().items()))), {"a": torch.zeros(2, 2)}, cfg)
    assert base != reply_key("evaluate", _values(), adapter, cfg)
    assert base != reply_key("train", _values(lr=2e-5), adapter, cfg)
    assert base != reply_key("train", _values(), {"a": torch.eye(2)}, cfg)
    assert base != reply_key("train", _values(), adapter, load_config(None, ["train.steps=3"]))
