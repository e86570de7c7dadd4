"""Hostile instructions are refused before the hospital spends anything (client/instruction.py).

Each case of the table mutates a valid train instruction. Every one is refused — by
``check_instruction`` alone, and through the ClientApp with a real hospital, a real model
and DP on, where the reply is ``status`` 4 and nothing else and the privacy ledger stays
untouched. The same valid instruction, unmutated, does train and charge the ledger.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.instruction import InstructionError, check_instruction, check_values
from client.site import Site
from common import keys
from common.config import HospitalConfig, load_config
from common.modeling.lora import init_adapter
from common.wire import encode_adapter
from simulation.inprocess import enter_task

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
SHAPES = {A: (2, 8), B: (8, 2)}
HUGE = 500_000_000
LEDGER = "privacy_ledger.json"


class _HugePayload(bytes):
    """Reports 500 MB without allocating them."""

    def __len__(self) -> int:
        return HUGE


def _valid_values() -> dict[str, Any]:
    return {
        keys.SERVER_ROUND: 1, keys.SEED: 0, keys.PLANNED_ROUNDS: 1, keys.WIRE_PRECISION: "fp32",
        keys.ONLY_B: False, keys.DOMAIN_NAMES: ["a", "b"], keys.DOMAIN_COUNT: [10.0, 20.0],
        keys.DOMAIN_MEAN: [0.5, -1.0], "hp.train.lr": 1e-5, "hp.rollout.temperature": 1.0,
        "hp.train.kl_coef": 1e-4,
    }


# A case mutates the values and the adapter in place; it may return the record to send.
Case = Callable[[dict[str, Any], dict[str, torch.Tensor]], ArrayRecord | None]


def _set(key: str, value: Any) -> Case:
    return lambda values, tensors: values.__setitem__(key, value)


def _nan_adapter(values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    first = next(iter(tensors))
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = math.nan


def _with_array(name: str, make: Callable[[tuple[int, ...]], Array]) -> Case:
    def case(values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ArrayRecord:
        record = encode_adapter(tensors, "fp32")
        shape = tuple(tensors[name].shape) if name in tensors else (HUGE // 4,)
        record[name if name in tensors else "base_model.extra.lora_B.weight"] = make(shape)
        return record
    return case


def _huge(shape: tuple[int, ...]) -> Array:
    return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=_HugePayload(b""))


def _missing(values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    del tensors[next(iter(tensors))]


def _wrong_shape(values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    name = next(iter(tensors))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])


def _wrong_dtype(values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    record = encode_adapter(tensors, "fp32")
    name = next(iter(tensors))
    record[name] = Array(tensors[name].half().numpy())
    return record


HOSTILE: dict[str, Case] = {
    "nan-adapter": _nan_adapter,
    "inf-temperature": _set("hp.rollout.temperature", math.inf),
    "inf-kl-coef": _set("hp.train.kl_coef", math.inf),
    "nan-lr": _set("hp.train.lr", math.nan),
    "inf-lr (would be clamped)": _set("hp.train.lr", math.inf),
    "negative-temperature": _set("hp.rollout.temperature", -1.0),
    "string-steps": _set("hp.train.steps", "10"),
    "inf-domain-count": _set(keys.DOMAIN_COUNT, [math.inf, 20.0]),
    "nan-domain-mean": _set(keys.DOMAIN_MEAN, [math.nan, 0.5]),
    "short-domain-counts": _set(keys.DOMAIN_COUNT, [10.0]),
    "duplicate-domains": _set(keys.DOMAIN_NAMES, ["a", "a"]),
    "unknown-precision": _set(keys.WIRE_PRECISION, "fp8"),
    "negative-seed": _set(keys.SEED, -1),
    "huge-seed": _set(keys.SEED, 1 << 63),
    "negative-round": _set(keys.SERVER_ROUND, -1),
    "string-round": _set(keys.SERVER_ROUND, "1"),
    "negative-planned-rounds": _set(keys.PLANNED_ROUNDS, -3),
    "string-only-b": _set(keys.ONLY_B, "yes"),
    "extra-500MB-tensor": _with_array("extra", _huge),
    "500MB-payload-for-an-expected-name": _with_array(B, _huge),
    "missing-tensor": _missing,
    "wrong-shape": _wrong_shape,
    "wrong-dtype": _wrong_dtype,
    "no-adapter": lambda values, tensors: None,  # _content sends no arrays record at all
}


def _content(case: Case | None, shapes: Mapping[str, tuple[int, ...]]) -> RecordDict:
    values = _valid_values()
    tensors = init_adapter(shapes, seed=0, b_std=0.01)
    record = case(values, tensors) if case is not None else None
    if record is None:
        record = encode_adapter(tensors, "fp32")
    content = RecordDict({keys.CONFIG: ConfigRecord(values)})
    if case is not HOSTILE.get("no-adapter"):
        content[keys.ARRAYS] = record
    return content


# ------------------------------------------------------------------ check_instruction alone


@pytest.fixture
def site(tmp_path: Path) -> Site:
    (tmp_path / "data").mkdir()
    hospital = HospitalConfig(name="h", data_root=str(tmp_path / "data"), state_dir=str(tmp_path / "state"))
    return Site("h", hospital, simulated=False)


def test_a_valid_instruction_passes_with_its_values(site: Site) -> None:
    """The unmutated instruction passes; the adapter comes back fp32 and the config tuned."""
    checked = check_instruction(_content(None, SHAPES), run_cfg=load_config(), site=site,
                                adapter_shapes=lambda cfg: SHAPES)
    assert set(checked.adapter) == set(SHAPES) and all(t.dtype == torch.float32 for t in checked.adapter.values())
    assert checked.cfg.train.kl_coef == 1e-4 and checked.precision == "fp32"


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_every_hostile_instruction_is_refused(name: str, site: Site) -> None:
    """Each case raises InstructionError (never another exception, never a pass)."""
    with pytest.raises(InstructionError):
        check_instruction(_content(HOSTILE[name], SHAPES), run_cfg=load_config(), site=site,
                          adapter_shapes=lambda cfg: SHAPES)


def test_a_finite_value_over_the_limit_is_clamped_not_refused(site: Site) -> None:
    """Finite but above the hospital's limits: the limits are used."""
    content = _content(_set("hp.rollout.temperature", 1e6), SHAPES)
    content[keys.CONFIG]["hp.train.lr"] = 10.0
    checked = check_instruction(content, run_cfg=load_config(), site=site, adapter_shapes=lambda cfg: SHAPES)
    assert checked.cfg.rollout.temperature == site.hospital.limits.max_temperature
    assert checked.cfg.train.lr == site.hospital.limits.max_lr


def test_the_adapter_is_not_decoded_before_the_values_pass(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value is refused before the adapter's shapes are even asked for."""
    asked: list[object] = []
    with pytest.raises(InstructionError, match="wire-precision"):
        check_instruction(_content(_set(keys.WIRE_PRECISION, "fp8"), SHAPES), run_cfg=load_config(), site=site,
                          adapter_shapes=lambda cfg: asked.append(cfg) or SHAPES)
    assert not asked


def test_check_values_names_the_bad_key() -> None:
    values = _valid_values()
    values[keys.DOMAIN_COUNT] = [1.0, math.inf]
    with pytest.raises(InstructionError, match=r"domain-count\[1\]"):
        check_values(values)


# ------------------------------------------------------------------ through the ClientApp


def _hospital_yaml(base: Path, root: Path, state: str, privacy_extra: str = "") -> dict[str, str]:
    """The node config of a hospital whose state (privacy ledger) lives in ``base/state``."""
    path = base / f"{state}.yaml"
    path.write_text(
        f"name: h0\ndata_root: {root}\nstate_dir: {base / state}\nmax_eval_records: 4\n"
        "privacy:\n  target_epsilon: 50.0\n  planned_rounds: 5\n  noise_multiplier: 1.0\n  secure_rng: false\n"
        + privacy_extra
        + "limits:\n  max_evaluations_per_round: 1\n  max_evaluations_total: 2\n", encoding="utf-8")
    return {"hospital-config": str(path)}


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One synthetic hospital with DP on, started from its own hospital.yaml."""
    from client.runtime import RUNTIME
    from client.site import effective_config, resolve_site
    from common.modeling.lora import adapter_shapes
    from common.runconfig import config_from_run_config
    from simulation.synth import generate_federation

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("instruction")
    root = generate_federation(base / "fed", hospitals=1, seed=0, scale=0.25).hospital_roots[0]
    run_config = {"overrides": f"model.cache_dir={base / 'cache'} model.device=cpu train.steps=1 "
                               "rollout.batch_prompts=4 rollout.num_rollouts=2 rollout.max_new_tokens=8"}
    site = resolve_site(_hospital_yaml(base, root, "state"), run_config)
    shapes = adapter_shapes(RUNTIME.policy(effective_config(config_from_run_config(run_config), site, {})).peft)
    enter_task()
    return {"base": base, "root": root, "run_config": run_config, "shapes": shapes}


def _call(hospital: dict[str, Any], state: str, content: RecordDict, kind: str = "train",
          server_round: int | None = None, privacy_extra: str = "") -> Message:
    from client.client_app import app

    if server_round is not None:
        content[keys.CONFIG][keys.SERVER_ROUND] = server_round
    msg = Message(content, dst_node_id=1, message_type=kind, group_id="1")
    node_config = _hospital_yaml(hospital["base"], hospital["root"], state, privacy_extra)
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config=dict(hospital["run_config"]))
    return app(msg, context)


def _ledger_entries(state: Path) -> list[dict[str, Any]]:
    path = state / LEDGER
    return json.loads(path.read_text(encoding="utf-8"))["entries"] if path.is_file() else []


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_instruction_reaching_the_client_app_spends_nothing(name: str, hospital: dict[str, Any]) -> None:
    """Train and evaluate: no ledger entry, no evaluation counted, the reply is status 4 alone."""
    state = f"state-{sorted(HOSTILE).index(name)}"
    for kind in ("train", "evaluate"):
        reply = _call(hospital, state, _content(HOSTILE[name], hospital["shapes"]), kind)
        assert _ledger_entries(hospital["base"] / state) == [], f"{kind} charged the privacy ledger"
        assert not reply.has_error() and not reply.content.array_records
        assert dict(reply.content.metric_records[keys.METRICS]) == {keys.STATUS: keys.STATUS_REFUSED}
    assert not (hospital["base"] / state / "evaluations.json").exists()


def test_the_valid_instruction_trains_and_charges_the_ledger(hospital: dict[str, Any]) -> None:
    """The control of the table above: unmutated, the instruction is carried out."""
    reply = _call(hospital, "state-valid", _content(None, hospital["shapes"]), "train")
    assert reply.content.metric_records[keys.METRICS][keys.STATUS] == keys.STATUS_OK
    assert "dpsgd" in [e["kind"] for e in _ledger_entries(hospital["base"] / "state-valid")]


def test_evaluations_are_bounded_per_round_and_in_total(hospital: dict[str, Any]) -> None:
    """limits: 1 per round, 2 in total. Over them the reply is status 5 and nothing else."""
    def status(server_round: int, seed: int) -> dict[str, Any]:
        content = _content(None, hospital["shapes"])
        # A new seed makes each one a new evaluation (the same one asked again is re-sent:
        # tests/client/test_hospital_reply_cache.py).
        content[keys.CONFIG][keys.SEED] = seed
        reply = _call(hospital, "state-eval", content, "evaluate", server_round)
        return dict(reply.content.metric_records[keys.METRICS])

    assert status(1, 0)[keys.STATUS] == keys.STATUS_OK
    assert status(1, 1) == {keys.STATUS: keys.STATUS_EVAL_LIMIT}  # second of round 1
    assert status(2, 2)[keys.STATUS] == keys.STATUS_OK
    assert status(3, 3) == {keys.STATUS: keys.STATUS_EVAL_LIMIT}  # third in total


def test_withheld_evaluations_do_not_use_up_the_limits(hospital: dict[str, Any]) -> None:
    """Under DP with eval_release: none nothing is sent, so nothing counts against the limits."""
    for server_round in (1, 1, 1):  # past 1 per round and 2 in total, were they counted
        reply = _call(hospital, "state-withheld", _content(None, hospital["shapes"]), "evaluate", server_round,
                      privacy_extra="  eval_release: none\n")
        assert dict(reply.content.metric_records[keys.METRICS]) == {keys.STATUS: keys.STATUS_OK,
                                                                     keys.NUM_EXAMPLES: 0}
