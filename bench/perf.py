"""Every performance ratio of issue 14, measured side by side in one run.

    .venv/bin/python bench/perf.py --out runs/perf            # the full measurement
    .venv/bin/python bench/perf.py --quick --out runs/perf-q  # tiny sizes, checks the code

Writes ``perf.json`` (per measurement: value, target, met, details; the machine) and
``perf.png`` (one panel per ratio with its target line) into ``--out``.

1. ``dp``: DP-SGD update / plain update on a fixed rollout batch, time and peak memory,
   for the tiny preset and smollm2-135m. Time: one process, one policy, DP and plain
   updates interleaved (ABAB) after a warm-up of each, so that other load on the machine
   hits both alike; median and spread of the per-pair ratios. Memory: each mode in its
   own process; the process's peak resident set (``VmHWM``, reset after set-up through
   ``/proc/self/clear_refs``) over the updates, and its increment over the resident set
   before the first update.
2. ``wire``: bytes of the serialised reply a hospital sends in a round (the protobuf of
   the Flower ``Message`` the ClientApp builds: ``arrays`` from ``encode_adapter`` plus
   the ``metrics``) / the bytes of the tensors it carries; for ``fedit`` and ``ffa`` and
   each wire precision; also / the base model's bytes.
3. ``aggregation``: ``server.aggregation.aggregate`` throughput (input bytes / time) vs
   a NumPy copy of the same input bytes, 2..32 hospitals, Qwen2.5-7B LoRA shapes.
4. ``federation``: ``fedclimb simulate`` round wall time / the slowest hospital's local
   compute (rollout + update seconds), rounds after the first; start-up reported apart.
5. ``rollout``: ``Policy.generate`` tokens/s / the same model's plain ``generate`` on the
   same prompts (each repeated K times), interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SMOLLM2 = ["model=smollm2-135m", "model.precision=bf16", "prompt.constrained=true"]
TINY: list[str] = ["model=tiny"]
PRESETS = {"tiny": TINY, "smollm2-135m": SMOLLM2}

#: Qwen2.5-7B (text): hidden 3584, intermediate 18944, 28 layers, 28 heads / 4 kv heads of 128.
QWEN7B = {"hidden": 3584, "intermediate": 18944, "layers": 28, "heads": 28, "kv_heads": 4, "head_dim": 128,
          "vocab": 152064}

TARGETS = {"dp_time": ("<=", 1.3), "dp_memory": ("<=", 1.5), "wire": ("<=", 1.02),
           "aggregation": (">=", 0.5), "federation": ("<=", 1.2), "rollout": (">=", 1.0)}


# ----------------------------------------------------------------------------- pure helpers


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the interquartile range of ``values`` (non-empty)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("summary of no values")
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3, "n": len(xs)}


def pair_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-pair ratios ``a_i / b_i`` of interleaved measurements."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("pair_ratios needs two equally long, non-empty sequences")
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def met(value: float, target: tuple[str, float]) -> bool:
    """Whether ``value`` meets ``(op, bound)`` with op ``<=`` or ``>=``."""
    op, bound = target
    if op == "<=":
        return value <= bound
    if op == ">=":
        return value >= bound
    raise ValueError(f"unknown comparison {op!r}")


def entry(name: str, value: float, target_key: str, unit: str = "x", **details: Any) -> dict[str, Any]:
    """One measurement of perf.json."""
    op, bound = TARGETS[target_key]
    return {"name": name, "value": value, "unit": unit, "target": f"{op} {bound}", "target_op": op,
            "target_value": bound, "met": met(value, (op, bound)), **details}


def lora_shapes(cfg: dict[str, int], rank: int) -> dict[str, tuple[int, int]]:
    """PEFT names and shapes of a rank-``rank`` LoRA on q,k,v,o,gate,up,down of a Qwen2-style model."""
    h, i = cfg["hidden"], cfg["intermediate"]
    kv = cfg["kv_heads"] * cfg["head_dim"]
    proj = {"self_attn.q_proj": (h, cfg["heads"] * cfg["head_dim"]), "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv), "self_attn.o_proj": (cfg["heads"] * cfg["head_dim"], h),
            "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(cfg["layers"]):
        for name, (fan_in, fan_out) in proj.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, rank)
    return shapes


def qwen_text_params(cfg: dict[str, int]) -> int:
    """Parameters of a Qwen2-style text model (untied embeddings, q/k/v biases, RMSNorms)."""
    h, i = cfg["hidden"], cfg["intermediate"]
    q, kv = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    attn = h * q + q + 2 * (h * kv + kv) + q * h
    layer = attn + 3 * h * i + 2 * h
    return cfg["layers"] * layer + 2 * cfg["vocab"] * h + h


def machine() -> dict[str, Any]:
    """CPU model, core count, memory and library versions of this machine."""
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    import flwr

    return {"cpu": model or platform.processor(), "nproc": os.cpu_count(), "memory": mem,
            "torch": torch.__version__, "flwr": flwr.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------- 1. DP / plain


def _dp_setup(preset: str, prompts: int, data: str) -> tuple:
    """bench/dp_overhead.py's DP set-up (one policy and trainer, a fixed rollout batch, DP settings)
    for ``preset``, with LoRA r = 16 on all seven projections. The DP updater's hooks are off
    outside DP steps, so plain updates of the same trainer are plain."""
    from dp_overhead import setup

    return setup(preset, True, 16, prompts, data,
                 overrides=[*PRESETS[preset], "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"])


def _profile(fn: Callable[[], Any], top: int = 12) -> list[dict[str, Any]]:
    """cProfile of one call of ``fn``: total, then the functions with the most own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = [{"function": f"{Path(file).name}:{line}:{func}", "tottime_s": tt, "cumtime_s": ct,
             "tot_fraction": tt / total if total else 0.0}
            for (file, line, func), (_, _, tt, ct, _) in stats.stats.items()]  # type: ignore[attr-defined]
    rows.sort(key=lambda r: -r["tottime_s"])
    return [{"total_s": total}, *rows[:top]]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _dp_memory_child(preset: str, mode: str, prompts: int, updates: int, data: str) -> dict[str, Any]:
    """Peak RSS of ``updates`` updates of one mode (run in its own process)."""
    import gc

    import torch
    from dp_overhead import run_update

    torch.set_num_threads(1)
    bundle, policy, trainer, records, rollouts, adv, opt, settings = _dp_setup(preset, prompts, data)
    gc.collect()
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    for _ in range(updates):
        run_update(trainer, rollouts, adv, opt, settings if mode == "dp" else None, len(records))
    peak = _status_kib("VmHWM")
    return {"mode": mode, "rss_before_kib": before, "peak_rss_kib": peak, "hwm_reset": reset,
            "increment_kib": peak - before}


def measure_dp(preset: str, prompts: int, pairs: int, mem_updates: int, data: str) -> dict[str, Any]:
    import torch
    from dp_overhead import run_update

    torch.set_num_threads(1)
    t_setup = time.perf_counter()
    bundle, policy, trainer, records, rollouts, adv, opt, settings = _dp_setup(preset, prompts, data)
    setup_s = time.perf_counter() - t_setup

    def timed(dp: bool) -> float:
        t0 = time.perf_counter()
        run_update(trainer, rollouts, adv, opt, settings if dp else None, len(records))
        return time.perf_counter() - t0

    timed(False), timed(True)  # warm-up of each mode
    dp_s, plain_s = [], []
    for i in range(pairs):  # ABAB, alternating which goes first
        if i % 2:
            dp_s.append(timed(True)), plain_s.append(timed(False))
        else:
            plain_s.append(timed(False)), dp_s.append(timed(True))
    ratios = pair_ratios(dp_s, plain_s)
    # What drawing the noise ahead (on a core torch leaves free) buys: DP updates with the
    # noise drawn inline against drawn ahead, alternating, same inputs.
    from client.dp_step import DPUpdater

    updater = DPUpdater.for_policy(policy)
    inline_s, ahead_s = [], []
    for i in range(pairs):
        for ahead in ((True, False) if i % 2 else (False, True)):
            updater.draw_ahead = ahead
            (ahead_s if ahead else inline_s).append(timed(True))
    updater.draw_ahead = True
    inline = summary(pair_ratios(inline_s, ahead_s))
    profile = {mode: _profile(lambda d=(mode == "dp"): timed(d)) for mode in ("plain", "dp")}
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    rows = rollouts.num_rows
    tokens = int(rollouts.mask.sum())
    del bundle, policy, trainer
    mem = {}
    for mode in ("plain", "dp"):
        cmd = [sys.executable, __file__, "--_dp-memory", preset, mode, str(prompts), str(mem_updates), data]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        mem[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    time_ratio = summary(ratios)
    mem_ratio = mem["dp"]["peak_rss_kib"] / mem["plain"]["peak_rss_kib"]
    inc_ratio = mem["dp"]["increment_kib"] / max(mem["plain"]["increment_kib"], 1)
    common = {"preset": preset, "overrides": PRESETS[preset], "prompts": prompts, "rows": rows,
              "response_tokens": tokens, "trainable": trainable, "lora": "r=16 on all seven projections, fedit"}
    return {
        "time": entry(f"dp_time/{preset}", time_ratio["median"], "dp_time", ratio_spread=time_ratio,
                      dp_s=summary(dp_s), plain_s=summary(plain_s), pairs=pairs, profile=profile, setup_s=setup_s,
                      noise_inline_over_ahead=inline, dp_inline_s=summary(inline_s), **common),
        "memory": entry(f"dp_memory/{preset}", mem_ratio, "dp_memory", increment_ratio=inc_ratio,
                        memory_kind="process peak RSS (VmHWM, reset after set-up) over the updates",
                        dp=mem["dp"], plain=mem["plain"], updates=mem_updates, **common),
    }


# ----------------------------------------------------------------------------- 2. wire


def _reply_bytes(adapter: dict, precision: str, metrics: dict[str, Any]) -> tuple[int, int]:
    """Serialised size of the hospital's train reply, and of its arrays' payloads."""
    from flwr.app import Metadata, MetricRecord, RecordDict
    from flwr.common.serde import make_message, message_to_proto

    from common import keys
    from common.wire import encode_adapter

    arrays = encode_adapter(adapter, precision)  # type: ignore[arg-type]
    content = RecordDict({keys.METRICS: MetricRecord(metrics), keys.ARRAYS: arrays})
    # A reply's metadata as Flower fills it (64-bit ids, a 64-hex message id, timestamps).
    meta = Metadata(run_id=2**63 - 1, message_id="f" * 64, src_node_id=2**63 - 1, dst_node_id=1,
                    reply_to_message_id="e" * 64, group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type="train")
    msg = make_message(meta, content)
    size = message_to_proto(msg).ByteSize()
    payload = sum(len(a.data) for a in arrays.values())
    return size, payload


def _adapter_for(overrides: list[str]) -> tuple[dict, int, int, str]:
    """A preset's trained adapter (its own LoRA settings), its base model's bytes and parameters."""
    from common.config import load_config
    from common.modeling.loader import load_base_model
    from common.modeling.policy import Policy

    cfg = load_config(overrides=overrides)
    bundle = load_base_model(cfg.model)
    policy = Policy(bundle, cfg.lora)
    adapter = policy.get_adapter()
    base = [p for n, p in bundle.model.named_parameters() if "lora_" not in n]
    base_bytes = sum(p.numel() * p.element_size() for p in base)
    base_params = sum(p.numel() for p in base)
    lora = f"r={cfg.lora.r} on {','.join(cfg.lora.targets)}"
    return adapter, base_bytes, base_params, lora


def measure_wire(quick: bool) -> list[dict[str, Any]]:
    import torch

    from common import keys

    metrics = {keys.STATUS: 0, keys.LOCAL_STEPS: 20, keys.ROLLOUT_SECONDS: 12.345, keys.UPDATE_SECONDS: 23.456,
               keys.NUM_EXAMPLES: 390, keys.REWARD_MEAN: 0.75, keys.D_COUNT: [188.4, 42.1, 45.9, 7.8, 105.4]}
    cases: list[tuple[str, dict, int, str]] = []
    presets = {"tiny": TINY} if quick else {"tiny": TINY, "smollm2-135m": SMOLLM2}
    for name, ov in presets.items():
        adapter, base_bytes, _, lora = _adapter_for(ov)
        cases.append((name, adapter, base_bytes, lora))
    # Qwen2.5-7B shapes (random values; the size does not depend on them). Base in bf16.
    cfg7 = dict(QWEN7B, layers=2) if quick else QWEN7B
    gen = torch.Generator().manual_seed(0)
    adapter7 = {k: torch.randn(s, generator=gen) * 0.01 for k, s in lora_shapes(cfg7, 16).items()}
    cases.append((f"qwen2.5-7b-shapes{' (2 layers)' if quick else ''}", adapter7, 2 * qwen_text_params(cfg7),
                  "r=16 on all seven projections"))
    out = []
    for name, adapter, base_bytes, lora in cases:
        full_fp32 = sum(t.numel() * 4 for t in adapter.values())
        for mode in ("fedit", "ffa"):
            sent = adapter if mode == "fedit" else {k: v for k, v in adapter.items() if k.endswith(".lora_B.weight")}
            for precision in ("fp32", "fp16", "bf16"):
                itemsize = 4 if precision == "fp32" else 2
                tensor_bytes = sum(t.numel() * itemsize for t in sent.values())
                size, payload = _reply_bytes(sent, precision, metrics)
                out.append(entry(f"wire/{name}/{mode}/{precision}", size / tensor_bytes, "wire",
                                 model=name, lora=lora, aggregation=mode, precision=precision, message_bytes=size,
                                 array_payload_bytes=payload, tensor_bytes=tensor_bytes,
                                 tensors=len(sent),
                                 overhead_bytes_per_tensor=(size - tensor_bytes) / len(sent),
                                 vs_full_fp32_adapter=size / full_fp32,
                                 vs_base_model=size / base_bytes, base_model_bytes=base_bytes))
    return out


# ----------------------------------------------------------------------------- 3. aggregation


def measure_aggregation(hospitals: Sequence[int], layers: int, svd_layers: int, chunk: int,
                        repeats: int) -> dict[str, Any]:
    """``aggregate`` on Qwen2.5-7B LoRA shapes, streamed ``chunk`` layers at a time."""
    import numpy as np
    import torch

    from server.aggregation import aggregate

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []
    for k in hospitals:
        weights = [1.0 / k] * k
        per_mode = {m: {"agg_s": 0.0, "copy_s": 0.0, "bytes": 0, "layers": 0} for m in ("fedit", "ffa", "svd")}
        done = 0
        while done < layers:
            n = min(chunk, layers - done)
            shapes = lora_shapes(dict(QWEN7B, layers=n), 16)
            glob = {key: torch.randn(s, generator=gen) * 0.01 for key, s in shapes.items()}
            clients = [{key: g + 1e-3 * torch.randn(g.shape, generator=gen) for key, g in glob.items()}
                       for _ in range(k)]
            for mode in ("fedit", "ffa", "svd"):
                if mode == "svd" and done >= svd_layers:
                    continue
                if mode == "ffa":
                    sent = [{key: t for key, t in c.items() if key.endswith(".lora_B.weight")} for c in clients]
                else:
                    sent = clients
                inputs = [*glob.values(), *(t for c in sent for t in c.values())]
                nbytes = sum(t.numel() * t.element_size() for t in inputs)
                agg_best = copy_best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    aggregate(glob, sent, weights, mode=mode)
                    agg_best = min(agg_best, time.perf_counter() - t0)
                    arrays = [t.numpy() for t in inputs]
                    dst = [np.empty_like(a) for a in arrays]
                    t0 = time.perf_counter()
                    for a, d in zip(arrays, dst, strict=True):
                        np.copyto(d, a)
                    copy_best = min(copy_best, time.perf_counter() - t0)
                    del dst
                rec = per_mode[mode]
                rec["agg_s"] += agg_best
                rec["copy_s"] += copy_best
                rec["bytes"] += nbytes
                rec["layers"] += n
            del clients, glob
            done += n
        for mode, rec in per_mode.items():
            agg_bw, copy_bw = rec["bytes"] / rec["agg_s"], rec["bytes"] / rec["copy_s"]
            row = entry(f"aggregation/{mode}/{k}", agg_bw / copy_bw, "aggregation", mode=mode, hospitals=k,
                        layers=rec["layers"], input_bytes=rec["bytes"], agg_s=rec["agg_s"], copy_s=rec["copy_s"],
                        agg_gb_s=agg_bw / 1e9, copy_gb_s=copy_bw / 1e9, seconds_per_layer=rec["agg_s"] / rec["layers"],
                        seconds_all_layers=rec["agg_s"] / rec["layers"] * QWEN7B["layers"])
            if mode == "svd":
                row["target"], row["met"] = "reported (cost per layer)", None
            results.append(row)
    return {"rows": results, "layers": layers, "svd_layers": svd_layers, "chunk_layers": chunk, "repeats": repeats,
            "profile": profile_aggregation(hospitals=8)}


def profile_aggregation(hospitals: int, layers: int = 1, top: int = 8) -> dict[str, list[dict[str, Any]]]:
    """Where ``aggregate``'s time goes: cProfile of one call per mode on ``layers`` 7B-shaped layers."""
    import cProfile
    import pstats

    import torch

    from server.aggregation import aggregate

    gen = torch.Generator().manual_seed(1)
    shapes = lora_shapes(dict(QWEN7B, layers=layers), 16)
    glob = {key: torch.randn(s, generator=gen) * 0.01 for key, s in shapes.items()}
    clients = [{key: g + 1e-3 * torch.randn(g.shape, generator=gen) for key, g in glob.items()}
               for _ in range(hospitals)]
    out: dict[str, list[dict[str, Any]]] = {}
    for mode in ("fedit", "ffa", "svd"):
        sent = clients if mode != "ffa" else [
            {key: t for key, t in c.items() if key.endswith(".lora_B.weight")} for c in clients]
        prof = cProfile.Profile()
        prof.enable()
        aggregate(glob, sent, [1.0 / hospitals] * hospitals, mode=mode)
        prof.disable()
        stats = pstats.Stats(prof)
        total = stats.total_tt  # type: ignore[attr-defined]
        rows = []
        for (file, line, func), (_, _, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
            if "aggregation" in file or tt > 0.02 * total:
                rows.append({"function": f"{Path(file).name}:{line}:{func}", "tottime_s": tt, "cumtime_s": ct,
                             "cum_fraction": ct / total if total else 0.0})
        rows.sort(key=lambda r: -r["cumtime_s"])
        out[mode] = [{"total_s": total}, *rows[:top]]
    return out


# ----------------------------------------------------------------------------- 4. federation


def measure_federation(out: Path, steps: int, rounds: int, hospitals: int) -> dict[str, Any]:
    """``fedclimb simulate`` without DP (hospitals then report their rollout/update seconds)."""
    run_dir = out / "federation-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    fedclimb = Path(sys.executable).with_name("fedclimb")
    cmd = [str(fedclimb), "simulate", "--quiet", "--hospitals", str(hospitals), "--out", str(run_dir),
           "privacy=off", f"train.steps={steps}", f"federation.rounds={rounds}", "federation.evaluate=false",
           "federation.evaluate_initial=false", "model.cpu_threads=1"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    total_s = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"simulate failed ({res.returncode}): {res.stdout[-2000:]} {res.stderr[-2000:]}")
    rounds_out = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        ev = json.loads(line)
        nodes = (ev.get("train") or {}).get("nodes") or {}
        compute = {n: float(v.get("train.rollout-s", 0)) + float(v.get("train.update-s", 0)) for n, v in nodes.items()}
        if not compute:
            continue
        slowest = max(compute.values())
        rounds_out.append({"round": ev["server_round"], "wall_s": ev["seconds"], "slowest_compute_s": slowest,
                           "compute_s": compute, "ratio": ev["seconds"] / slowest})
    later = [r for r in rounds_out if r["round"] > 1]
    ratios = [r["ratio"] for r in later]
    first = rounds_out[0]
    startup = {"process_total_s": total_s, "sum_round_wall_s": sum(r["wall_s"] for r in rounds_out),
               "outside_rounds_s": total_s - sum(r["wall_s"] for r in rounds_out),
               "first_round_excess_s": first["wall_s"] - first["slowest_compute_s"] - statistics.median(
                   [r["wall_s"] - r["slowest_compute_s"] for r in later]) if later else None}
    return entry("federation", summary(ratios)["median"], "federation", ratio_spread=summary(ratios),
                 rounds=rounds_out, startup=startup, steps=steps, hospitals=hospitals,
                 min_compute_s=min(r["slowest_compute_s"] for r in later),
                 command=" ".join(["fedclimb", *cmd[1:]]).replace(str(run_dir), "<out>/federation-run"))


# ----------------------------------------------------------------------------- 5. rollout


def measure_rollout(preset: str, overrides: list[str], prompts: int, rollouts: int, new_tokens: int, pairs: int,
                    data: str) -> dict[str, Any]:
    import torch

    from client.trainer import LocalTrainer
    from common.climb.records import load_records
    from common.config import load_config
    from common.modeling.loader import load_base_model
    from common.modeling.policy import Policy

    torch.set_num_threads(1)
    cfg = load_config(overrides=[*overrides, "privacy=off", "prompt.constrained=false",
                                 f"rollout.max_new_tokens={new_tokens}"])
    bundle = load_base_model(cfg.model)
    policy = Policy(bundle, cfg.lora)
    trainer = LocalTrainer(policy, cfg)
    records = trainer.usable([r for r in load_records(data, "train") if bundle.multimodal or not r.images])
    prompts_enc = [trainer.encode(r) for r in records[:prompts]]
    sync = torch.cuda.synchronize if bundle.device.type == "cuda" else (lambda: None)

    def run_policy(seed: int) -> tuple[float, int]:
        sync()
        t0 = time.perf_counter()
        ro = policy.generate(prompts_enc, num_rollouts=rollouts, temperature=0.7, max_new_tokens=new_tokens, seed=seed)
        sync()
        return time.perf_counter() - t0, int(ro.mask.sum())

    @torch.no_grad()
    def run_plain(seed: int) -> tuple[float, int]:
        sync()
        t0 = time.perf_counter()
        rows = [p for p in prompts_enc for _ in range(rollouts)]
        inputs = policy._inputs(rows)  # noqa: SLF001 - the same batch as Policy.generate
        torch.manual_seed(seed)
        gen = policy.sampling_config(temperature=0.7, max_new_tokens=new_tokens)
        policy.peft.eval()
        with policy.autocast():
            out = policy.peft.generate(**inputs, generation_config=gen)
        sync()
        elapsed = time.perf_counter() - t0
        mask = policy._response_mask(out[:, inputs["input_ids"].shape[1]:].cpu())  # noqa: SLF001
        return elapsed, int(mask.sum())

    run_policy(0), run_plain(0)  # warm-up
    pol, plain = [], []
    for i in range(pairs):
        order = (run_policy, run_plain) if i % 2 == 0 else (run_plain, run_policy)
        for fn in order:
            s, n = fn(100 + i)
            (pol if fn is run_policy else plain).append((s, n))
    pol_tps = [n / s for s, n in pol]
    plain_tps = [n / s for s, n in plain]
    ratios = pair_ratios(pol_tps, plain_tps)
    prompt_tokens = [len(p.input_ids) for p in prompts_enc] if hasattr(prompts_enc[0], "input_ids") else None
    return entry(f"rollout/{preset}", summary(ratios)["median"], "rollout", preset=preset, overrides=overrides,
                 prompts=prompts, rollouts=rollouts, max_new_tokens=new_tokens, pairs=pairs,
                 policy_tokens_s=summary(pol_tps), plain_tokens_s=summary(plain_tps), ratio_spread=summary(ratios),
                 policy_tokens=[n for _, n in pol], plain_tokens=[n for _, n in plain],
                 shared_prefill=not bundle.multimodal, prompt_tokens=prompt_tokens)


# ----------------------------------------------------------------------------- figure


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax = axes[0][0]
    dp = result.get("dp", {})
    labels, vals, los, his = [], [], [], []
    for preset, m in dp.items():
        sp = m["time"]["ratio_spread"]
        labels.append(f"{preset}\ntime")
        vals.append(m["time"]["value"]), los.append(sp["min"]), his.append(sp["max"])
        labels.append(f"{preset}\nmemory")
        vals.append(m["memory"]["value"]), los.append(m["memory"]["value"]), his.append(m["memory"]["value"])
    xs = range(len(vals))
    ax.bar(xs, vals, color=["C0", "C1"] * (len(vals) // 2))
    ax.errorbar(xs, vals, yerr=[[v - lo for v, lo in zip(vals, los)], [hi - v for v, hi in zip(vals, his)]],
                fmt="none", color="k", capsize=4)
    ax.set_xticks(list(xs), labels)
    ax.axhline(1.3, color="C0", ls="--", label="time target 1.3x")
    ax.axhline(1.5, color="C1", ls=":", label="memory target 1.5x")
    ax.set_title("1. DP / plain update (median, min-max of pairs)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    wire = result.get("wire", [])
    names = [w["name"].removeprefix("wire/") for w in wire]
    ax.barh(range(len(wire)), [w["value"] for w in wire], color="C2")
    ax.set_yticks(range(len(wire)), names, fontsize=6)
    ax.axvline(1.02, color="r", ls="--", label="target 1.02x")
    lo = min([w["value"] for w in wire] + [1.0])
    ax.set_xlim(max(0.0, lo - 0.01), max(1.05, max([w["value"] for w in wire] + [1.0]) + 0.01))
    ax.set_title("2. reply bytes / tensor bytes")
    ax.legend(fontsize=8)

    ax = axes[0][2]
    for i, w in enumerate(wire):
        ax.scatter(i, w["vs_base_model"], color="C2")
    ax.set_yscale("log")
    ax.set_xticks(range(len(wire)), names, rotation=90, fontsize=6)
    ax.set_title("2. reply bytes / base model bytes")

    ax = axes[1][0]
    agg = result.get("aggregation", {}).get("rows", [])
    for mode, color in (("fedit", "C0"), ("ffa", "C1"), ("svd", "C3")):
        rows = [r for r in agg if r["mode"] == mode]
        if rows:
            ax.plot([r["hospitals"] for r in rows], [r["value"] for r in rows], "o-", color=color, label=mode)
    ax.axhline(0.5, color="r", ls="--", label="target 0.5 (fedit, ffa)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("hospitals")
    ax.set_title("3. aggregation / numpy copy bandwidth (7B LoRA shapes)")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    fed = result.get("federation")
    if fed:
        rounds = fed["rounds"]
        ax.bar([r["round"] - 0.2 for r in rounds], [r["wall_s"] for r in rounds], 0.4, label="round wall time")
        ax.bar([r["round"] + 0.2 for r in rounds], [r["slowest_compute_s"] for r in rounds], 0.4,
               label="slowest hospital compute")
        for r in rounds:
            ax.text(r["round"], r["wall_s"], f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xlabel("round")
        ax.set_ylabel("s")
        ax.set_title(f"4. federation overhead: median {fed['value']:.2f}x after round 1 (target <= 1.2x)")
        ax.legend(fontsize=8)

    ax = axes[1][2]
    ro = result.get("rollout", [])
    ax.bar(range(len(ro)), [r["value"] for r in ro], color="C4")
    ax.errorbar(range(len(ro)), [r["value"] for r in ro],
                yerr=[[r["value"] - r["ratio_spread"]["min"] for r in ro],
                      [r["ratio_spread"]["max"] - r["value"] for r in ro]], fmt="none", color="k", capsize=4)
    ax.set_xticks(range(len(ro)), [r["preset"] for r in ro])
    ax.axhline(1.0, color="r", ls="--", label="target 1.0x")
    ax.set_title("5. Policy.generate / plain generate, tokens/s")
    ax.legend(fontsize=8)
    fig.suptitle(f"fedclimb performance ratios - {result['machine']['cpu']}, {result['machine']['nproc']} cores, "
                 f"torch {result['machine']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _yes(m: bool | None) -> str:
    return "-" if m is None else ("met" if m else "**not met**")


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of every number in ``result``."""
    lines: list[str] = []
    dp = result.get("dp", {})
    if dp:
        lines += ["| preset | rows x tokens | DP / plain time (median of pairs) | spread (min-max) | plain s | DP s "
                  "| DP s, noise inline (inline / ahead) | DP / plain peak RSS | increment ratio | time | memory |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for pr, m in dp.items():
            t, mem = m["time"], m["memory"]
            sp = t["ratio_spread"]
            inline = (f"{t['dp_inline_s']['median']:.2f} ({t['noise_inline_over_ahead']['median']:.2f}x)"
                      if "dp_inline_s" in t else "-")
            lines.append(f"| {pr} | {t['rows']} rows, {t['response_tokens']} response tokens | {t['value']:.2f}x "
                         f"({t['pairs']} pairs) | {sp['min']:.2f}-{sp['max']:.2f}x | {t['plain_s']['median']:.2f} "
                         f"| {t['dp_s']['median']:.2f} | {inline} | {mem['value']:.2f}x ({mem['dp']['peak_rss_kib'] / 1024:.0f} / "
                         f"{mem['plain']['peak_rss_kib'] / 1024:.0f} MiB) | {mem['increment_ratio']:.2f}x "
                         f"({mem['dp']['increment_kib'] / 1024:.0f} / {mem['plain']['increment_kib'] / 1024:.0f} MiB) "
                         f"| {_yes(t['met'])} | {_yes(mem['met'])} |")
        lines.append("")
    wire = result.get("wire", [])
    if wire:
        lines += ["| model | aggregation | wire | tensors | tensor bytes | reply bytes | reply / tensors | bytes per tensor "
                  "over payload | reply / fp32 adapter | reply / base model | target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for w in wire:
            lines.append(f"| {w['model']} | {w['aggregation']} | {w['precision']} | {w['tensors']} | {w['tensor_bytes']:,} "
                         f"| {w['message_bytes']:,} | {w['value']:.4f}x | {w['overhead_bytes_per_tensor']:.0f} "
                         f"| {w['vs_full_fp32_adapter']:.3f} | {w['vs_base_model']:.2e} | {_yes(w['met'])} |")
        lines.append("")
    agg = result.get("aggregation", {})
    if agg:
        lines += ["| mode | hospitals | input MB | aggregate GB/s | copy GB/s | aggregate / copy | s per layer "
                  "| s for 28 layers | target |", "|---|---|---|---|---|---|---|---|---|"]
        for r in agg["rows"]:
            lines.append(f"| {r['mode']} | {r['hospitals']} | {r['input_bytes'] / 1e6:.0f} | {r['agg_gb_s']:.3f} "
                         f"| {r['copy_gb_s']:.2f} | {r['value']:.3f} | {r['seconds_per_layer']:.3f} "
                         f"| {r['seconds_all_layers']:.1f} | {_yes(r['met'])} |")
        lines.append("")
    fed = result.get("federation")
    if fed:
        lines += ["| round | wall s | slowest hospital compute s | ratio |", "|---|---|---|---|"]
        for r in fed["rounds"]:
            lines.append(f"| {r['round']} | {r['wall_s']:.1f} | {r['slowest_compute_s']:.1f} | {r['ratio']:.2f}x |")
        lines.append("")
    ro = result.get("rollout", [])
    if ro:
        lines += ["| preset | batch | Policy.generate tokens/s | plain generate tokens/s | ratio (median of pairs) "
                  "| spread | target |", "|---|---|---|---|---|---|---|"]
        for r in ro:
            sp = r["ratio_spread"]
            lines.append(f"| {r['preset']} | {r['prompts']} prompts x {r['rollouts']} rollouts, <= {r['max_new_tokens']} "
                         f"new tokens | {r['policy_tokens_s']['median']:.1f} | {r['plain_tokens_s']['median']:.1f} "
                         f"| {r['value']:.2f}x ({r['pairs']} pairs) | {sp['min']:.2f}-{sp['max']:.2f}x | {_yes(r['met'])} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_dp-memory":
        preset, mode, prompts, updates, data = sys.argv[2:7]
        print(json.dumps(_dp_memory_child(preset, mode, int(prompts), int(updates), data)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the code, measures little")
    p.add_argument("--out", default="runs/perf")
    p.add_argument("--only", default="dp,wire,aggregation,federation,rollout",
                   help="comma-separated subset of the measurements")
    p.add_argument("--update", action="store_true",
                   help="keep the other measurements of OUT/perf.json and replace only those run now")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    from dp_overhead import bench_data

    data = bench_data()
    q = args.quick
    command = " ".join(["python", "bench/perf.py", *sys.argv[1:]])
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result: dict[str, Any] = {"machine": machine(), "quick": q, "command": command, "started": started, "seconds": {}}
    if args.update and (out / "perf.json").is_file():
        result = json.loads((out / "perf.json").read_text())
        result.setdefault("updates", []).append({"command": command, "started": started, "only": sorted(only),
                                                 "machine": machine()})

    def step(name: str, fn: Callable[[], Any]) -> None:
        if name not in only:
            return
        t0 = time.perf_counter()
        result[name] = fn()
        result["seconds"][name] = time.perf_counter() - t0
        print(f"[perf] {name} done in {result['seconds'][name]:.0f} s", flush=True)
        (out / "perf.json").write_text(json.dumps(result, indent=2, default=str))

    presets = ["tiny"] if q else ["tiny", "smollm2-135m"]
    step("dp", lambda: {pr: measure_dp(pr, prompts=2 if q else 8, pairs=2 if q else (10 if pr == "tiny" else 5),
                                        mem_updates=1 if q or pr != "tiny" else 2, data=data) for pr in presets})
    step("wire", lambda: measure_wire(q))
    # 4 of the 28 layers (all seven projections each): the merge is per layer, so the
    # throughput does not depend on how many; the 28-layer time is extrapolated.
    step("aggregation", lambda: measure_aggregation([2, 4] if q else [2, 4, 8, 16, 32], layers=1 if q else 4,
                                                    svd_layers=1 if q else 2, chunk=1 if q else 4,
                                                    repeats=1 if q else 2))
    step("federation", lambda: measure_federation(out, steps=2 if q else 60, rounds=2 if q else 3, hospitals=2))
    step("rollout", lambda: [measure_rollout(pr, PRESETS[pr], prompts=2 if q else (8 if pr == "tiny" else 2),
                                             rollouts=2 if q else 4, new_tokens=8 if q else 32,
                                             pairs=1 if q else (5 if pr == "tiny" else 3), data=data)
                             for pr in presets])
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "perf.json").write_text(json.dumps(result, indent=2, default=str))
    plot(result, out / "perf.png")
    (out / "perf_tables.md").write_text(tables(result))
    print(f"[perf] wrote {out / 'perf.json'} and {out / 'perf.png'}")


if __name__ == "__main__":
    main()
