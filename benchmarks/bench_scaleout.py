"""Scale-out on several GPUs (issue #20): replicas of the base, LoRA-aware routing, the whole graph
under a mixed load and autoscaling, in one local Ray cluster over every visible GPU.

    python benchmarks/bench_scaleout.py --smoke --out bench-out/scaleout          # CPU, tiny model: checks the script (~5 min)
    python benchmarks/bench_scaleout.py --model '{"source": "sdxl-arch"}' \\
        --compile-cache bench-out/compile-cache --out $OUT                        # GPU host (gpu_suite.sh scaleout)

The app is --config (default `configs/serve_config.gpu.yaml`, the shipped GPU config) with --model
merged over its model (a `source` other than the config's drops the keys only the config's source
has; `optimize` merges key by key). A `tiny` or `sdxl-arch` base gets its own family's ControlNets
and refiner in place of the config's pretrained ones. State, random LoRAs and (without
--compile-cache) the compile cache go under --out. Each engine replica takes --engine-gpus GPUs
(default 1 where CUDA is, else 0) and the config's `engine.num_cpus`. Image --size and --steps
for every request. Parts (--parts, in this order):

1. `replicas`: the base alone on each of --replicas counts (default 1, 2, 4, 8 up to the GPUs),
   started afresh, under a closed loop of --clients-per-gpu clients per replica for --duration-s:
   img/s in the steady window (from the answer that completes the first round of every client to
   the last send), per GPU, and the ratio to one replica (this run's, else --baseline-img-s)
   against the issue's goals (>= 1.9x at 2, 3.7x at 4, 7.2x at 8); each GPU's utilisation.
2. `routing`: the base on --routing-replicas replicas, each caching --cache-size LoRA sets, under
   a closed loop of --clients-per-gpu clients per replica (--routing-clients: another number in
   all) whose requests each name one of
   --adapters random LoRAs (the same seeded sequence), once per --routing-order policy:
   `loras.routing: multiplexed` (ours) and `any` (Ray's default routing), each on freshly started
   replicas: cache hits and loads summed over the replicas (hit rate, loads per minute), img/s,
   p50/p99 and the requests each replica served.
3. `graph`: the base, the config's ControlNet variants and its refiner, each at its autoscaling
   `max_replicas` fixed (fitted to the GPUs; --graph-replicas role=count overrides), under a
   closed loop of --clients-per-gpu clients per GPU in use sending --mix (default 50% base only,
   20% refined, 20% ControlNet, 10% hires x--hires-scale; LoRAs on --lora-share of them, of
   every kind: a refined request's LoRAs steer its base stage): where
   each deployment's replicas run (node and GPU ids from each replica's Ray runtime context), each
   GPU's utilisation (nvidia-smi, sampled), img/s, p50/p99 per kind and overall, and the share of
   the time each deployment's engines spent in forwards.
4. `autoscale`: the base autoscaled (the config's min replicas, target and upscale delay; max
   --autoscale-max, --downscale-delay-s) under one GPU's worth of clients (target_ongoing_requests
   clients: one replica at its target) for --before-s, --step-gpus GPUs' worth for --step-s, then
   one GPU's worth again for --after-s: seconds from the step until each new replica serves
   (RUNNING in `serve.status()`, i.e. warmed up and routable) and each replica's start (warm-up
   seconds, compile-cache hits and misses), p50/p99 before, during and after the step, img/s per
   10 s, seconds from the step's end until the replicas are back at the minimum, and replicas
   started again after the step (flapping).

Each part writes `bench_scaleout.json` into --out when it ends (a run cut short keeps what it
measured) and prints its table. GPU utilisation is sampled with `nvidia-smi` every second where it
exists (skipped on CPU).
"""

import argparse
import asyncio
import copy
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load import closed_loop, cluster, percentile, png_b64, random_loras, run_header, stepped_closed_loop  # noqa: E402

os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

APP = "scaleout"
BASE = "SDXLBase"
PATH = "/v1/txt2img"
#: The issue's goals: img/s on n replicas over one replica's.
GOALS = {2: 1.9, 4: 3.7, 8: 7.2}
#: Model keys only some sources have (dropped when --model names another source).
SOURCE_KEYS = ("name", "path", "variant", "vae_path", "local_files_only", "config", "seed")
#: The --smoke settings: the tiny model, eager, on CPU, small and short.
SMOKE = {
    "model": '{"source": "tiny", "device": "cpu", "dtype": "float32", "default_size": [128, 128], "default_steps": 20, '
             '"optimize": {"compile": "off", "batch_buckets": null}}',
    "size": 64, "steps": 4, "max_batch_size": 2, "engine_gpus": 0.0, "engine_cpus": 1.0, "ray_cpus": 16,
    "replicas": [1, 2], "clients_per_gpu": 4, "duration_s": 10.0,
    "routing_replicas": 2, "cache_size": 2, "adapters": 4, "lora_rank": 4,
    "graph_replicas": "base=1,canny=1,refiner=1",
    "autoscale_max": 2, "step_gpus": 2, "target_ongoing": 4.0, "upscale_delay_s": 1.0, "downscale_delay_s": 3.0,
    "before_s": 6.0, "step_s": 25.0, "after_s": 20.0, "down_wait_s": 20.0,
}


# -- the app ------------------------------------------------------------------------------------


def shipped_app(args) -> dict:
    """The config's app args with --model merged in, state under --out, and the resources these
    runs give (engine placement and the CPU-only replicas' CPUs)."""
    import yaml

    app = copy.deepcopy(yaml.safe_load(args.config.read_text())["applications"][0]["args"])
    model, override = app["model"], json.loads(args.model) if args.model else {}
    if override.get("source", model["source"]) != model["source"]:
        model = {key: value for key, value in model.items() if key not in SOURCE_KEYS}
    optimize = {**model.get("optimize", {}), **override.get("optimize", {})}
    optimize["compile_cache_dir"] = str((args.compile_cache or args.out / "compile-cache").resolve())
    model = app["model"] = {**model, **override, "optimize": optimize}
    if model["source"] in ("tiny", "sdxl-arch"):  # random or tiny weights: the family's own ControlNets and refiner
        for variant in (app.get("controlnets") or {}).values():
            variant["models"] = {name: _family_controlnet(model["source"], name) for name in variant["models"]}
        if app.get("refiner"):
            app["refiner"]["model"] = {"source": model["source"]}
    state = args.out / "state"
    app["state_dir"] = str(state.resolve())
    app["loras"] = {**app.get("loras", {}), "dir": str((state / "loras").resolve())}
    if args.max_batch_size:
        app["batching"] = {**app.get("batching", {}), "max_batch_size": args.max_batch_size}
    app["loras"]["cache_size"] = max(app["loras"].get("cache_size", 8), app.get("batching", {}).get("max_batch_size", 8))
    if args.engine_gpus == 0:  # a CPU run: the light replicas take no CPU of their own
        app["ingress"] = {**app.get("ingress", {}), "num_replicas": 1, "num_cpus": 0}
        app["jobs"] = {**app.get("jobs", {}), "num_cpus": 0}
    return app


def _family_controlnet(source: str, name: str) -> dict:
    return {"source": "tiny", "map": name} if source == "tiny" else {"source": "sdxl-arch"}


def _engine(args, shipped: dict, **placement: Any) -> dict:
    """An engine deployment's placement: --engine-gpus and --engine-cpus, the config's bound on
    queued requests, and `placement` (`num_replicas` or `autoscaling`)."""
    engine = {"num_gpus": args.engine_gpus, "num_cpus": args.engine_cpus, **placement}
    if "max_queued_requests" in shipped.get("engine", {}):
        engine["max_queued_requests"] = shipped["engine"]["max_queued_requests"]
    return engine


def base_only(args, shipped: dict, **placement: Any) -> dict:
    """The shipped app with the base deployment alone (no ControlNet variant, no refiner)."""
    return {**shipped, "engine": _engine(args, shipped, **placement), "controlnets": {}, "refiner": False}


def _replicas_wanted(config: dict) -> int:
    return (config.get("autoscaling") or {}).get("max_replicas", config.get("num_replicas", 1))


def fit_to_gpus(wanted: dict[str, int], gpus: float, per_replica: float) -> tuple[dict[str, int], float]:
    """Replica counts (and GPUs per replica) that fit `gpus`: fractional GPUs when not even one
    replica of each role fits on whole ones; then, when the wanted counts do not fit, each role
    its share of the replicas that do (at least one)."""
    if per_replica <= 0 or sum(wanted.values()) * per_replica <= gpus + 1e-9:
        return dict(wanted), per_replica
    if len(wanted) * per_replica > gpus:
        per_replica = 1 / math.ceil(len(wanted) / gpus)
    budget = int(gpus / per_replica + 1e-9)
    total = sum(wanted.values())
    counts = {role: max(1, int(count * budget / total)) for role, count in wanted.items()}
    while sum(counts.values()) > budget:
        role = max((role for role in counts if counts[role] > 1), key=counts.get)
        counts[role] -= 1
    for role in counts:  # what is left over, to the roles below their wanted counts, the base first
        counts[role] += min(budget - sum(counts.values()), wanted[role] - counts[role])
    return counts, per_replica


def check_fits(app: dict, gpus: int, ray_cpus: float) -> None:
    """Refuse, before anything starts, an app whose fixed replicas cannot all be placed (Serve
    would wait for them forever)."""
    engines = [app["engine"], *[v["engine"] for v in (app.get("controlnets") or {}).values()]]
    if app.get("refiner"):
        engines.append(app["refiner"]["engine"])

    def count(engine: dict) -> int:
        return (engine.get("autoscaling") or {}).get("min_replicas", engine.get("num_replicas", 1))

    gpus_needed = sum(count(e) * e.get("num_gpus", 0) for e in engines)
    ingress = app.get("ingress", {})
    cpus_needed = (sum(count(e) * e.get("num_cpus", 1) for e in engines) + ingress.get("num_replicas", 1) * ingress.get("num_cpus", 0.5)
                   + app.get("jobs", {}).get("num_cpus", 0.5))
    if gpus_needed > gpus + 1e-9 or cpus_needed > ray_cpus + 1e-9:
        raise SystemExit(f"the app needs {gpus_needed} GPUs and {cpus_needed} CPUs; this cluster has {gpus} and {ray_cpus}")


def deploy(ctx, app: dict) -> float:
    """Start `app` afresh (the previous one deleted first: replicas start anew, caches empty);
    the seconds until every replica is ready."""
    from ray import serve

    from serve_app.builder import build_app

    check_fits(app, ctx.gpus, ctx.args.ray_cpus)
    serve.delete(APP)
    started = time.perf_counter()
    serve.run(build_app(app), name=APP, route_prefix="/")
    return round(time.perf_counter() - started, 1)


# -- what the replicas say ----------------------------------------------------------------------


def _where(_actor: Any) -> dict:
    """Run inside a replica's process (`__ray_call__`): where Ray placed it."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "pid": os.getpid(), "gpu_ids": context.get_accelerator_ids().get("GPU", [])}


def placement() -> dict[str, list[dict]]:
    """Each deployment's live replicas: replica id, node, process and GPU ids, from each replica's
    own Ray runtime context."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#"
    found: dict[str, list[dict]] = {}
    for named in ray.util.list_named_actors(all_namespaces=True):
        if not named["name"].startswith(prefix):
            continue
        deployment, replica = named["name"][len(prefix):].rsplit("#", 1)
        try:
            where = ray.get(ray.get_actor(named["name"], namespace=named["namespace"]).__ray_call__.remote(_where), timeout=30)
        except Exception as error:  # noqa: BLE001 - a replica stopping meanwhile
            where = {"error": repr(error)[:200]}
        found.setdefault(deployment, []).append({"replica": replica, **where})
    return found


def per_replica(deployment: str, method: str = "stats", replicas: Optional[set] = None, tries: Optional[int] = None) -> dict[str, dict]:
    """`method`'s answer from every replica of `deployment` (each answer names its `replica`):
    asked through the router, which picks one per call, until each has answered (at most
    `tries` calls, default 30 a replica)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=APP)
    replicas = replicas if replicas is not None else {r["replica"] for r in placement().get(deployment, [])}
    seen: dict[str, dict] = {}
    for _ in range(tries or 30 * max(1, len(replicas))):
        if replicas <= set(seen):
            break
        answer = getattr(handle, method).remote().result(timeout_s=120)
        seen[answer["replica"]] = answer
    return seen


def replica_counts(deployment: str = BASE) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(APP)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(getattr(state, "value", state)): count for state, count in status.deployments[deployment].replica_states.items()}


class Sampler:
    """Calls `sample()` every `every_s` seconds on a thread while the block runs; `samples` holds
    `(seconds since the block began, value)`."""

    def __init__(self, sample: Callable[[], Any], every_s: float):
        self._sample, self._every_s = sample, every_s
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()

    def __enter__(self) -> "Sampler":
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.perf_counter() - self._started, 2), self._sample()))
            except Exception as error:  # noqa: BLE001 - a sample lost is not worth the run
                self.samples.append((round(time.perf_counter() - self._started, 2), {"error": repr(error)[:200]}))
            self._stop.wait(self._every_s)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


NVIDIA_SMI = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]


def _gpu_sample() -> dict[str, list[float]]:
    lines = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=10, check=True).stdout.strip().splitlines()
    return {index.strip(): [float(util), float(memory)] for index, util, memory in (line.split(",") for line in lines)}


def gpu_sampler() -> Sampler:
    """Each GPU's utilisation (%) and memory (MiB) every second, where nvidia-smi exists."""
    return Sampler(_gpu_sample if shutil.which("nvidia-smi") else (lambda: {}), 1.0)


def gpu_summary(sampler: Sampler, start_s: float = 0.0, end_s: float = math.inf) -> dict[str, dict]:
    """Per GPU over the samples in [start_s, end_s]: mean and max utilisation, most memory."""
    per_gpu: dict[str, list[list[float]]] = {}
    for at, sample in sampler.samples:
        if start_s <= at <= end_s and "error" not in sample:
            for index, values in sample.items():
                per_gpu.setdefault(index, []).append(values)
    return {
        index: {"util_mean": round(statistics.fmean(v[0] for v in values), 1), "util_max": max(v[0] for v in values),
                "memory_max_mib": max(v[1] for v in values), "samples": len(values)}
        for index, values in sorted(per_gpu.items(), key=lambda item: int(item[0]))
    }


# -- loads and their summaries ------------------------------------------------------------------


def run_load(ctx, levels: list[tuple[float, int]], make_body: Callable[[int], dict]):
    return asyncio.run(stepped_closed_loop(ctx.url, PATH, levels, make_body))


def warm_up(ctx, clients: int) -> None:
    """Two plain requests per client: every replica has run a request before the measurement."""
    bodies = [ctx.body(i) for i in range(2 * clients)]
    asyncio.run(closed_loop(ctx.url, PATH, clients, bodies))


def steady_window(answers: list, clients: int, end_s: float) -> tuple[float, float]:
    """From the answer completing the first round of every client (the loop is then full) to the
    last send: the window throughput is counted in."""
    done = sorted(sent + latency for _, sent, latency, _ in answers)
    start = done[min(len(done), clients) - 1] if done else 0.0
    return start, end_s


def latency_summary(answers: list) -> dict:
    """Latencies of the answered (200) requests; the others counted, with their first distinct
    answers."""
    ok = [latency for _, _, latency, response in answers if response.status_code == 200]
    summary: dict[str, Any] = {"requests": len(ok), "errors": len(answers) - len(ok)}
    if ok:
        summary.update(p50_s=round(percentile(ok, 50), 3), p99_s=round(percentile(ok, 99), 3), mean_s=round(statistics.fmean(ok), 3))
    failed = sorted({f"{response.status_code} {response.text[:300]}" for _, _, _, response in answers if response.status_code != 200})
    if failed:
        summary["error_answers"] = failed[:5]
    return summary


def throughput(answers: list, start_s: float, end_s: float) -> Optional[float]:
    """Images answered (200) per second, completing within [start_s, end_s]."""
    if end_s <= start_s:
        return None
    done = [sent + latency for _, sent, latency, response in answers if response.status_code == 200]
    return round(sum(1 for at in done if start_s <= at <= end_s) / (end_s - start_s), 4)


def measure(ctx, clients: int, duration_s: float, make_body: Callable[[int], dict]) -> tuple[dict, list, Sampler]:
    """A closed loop of `clients` for `duration_s`: throughput in the steady window, latencies
    (of the requests sent in it), GPUs sampled."""
    with gpu_sampler() as gpus:
        answers, wall_s = run_load(ctx, [(duration_s, clients)], make_body)
    start, end = steady_window(answers, clients, duration_s)
    in_window = [answer for answer in answers if start <= answer[1] <= end]
    row = {
        "clients": clients, "duration_s": duration_s, "wall_s": round(wall_s, 1), "window_s": [round(start, 1), round(end, 1)],
        "img_per_s": throughput(answers, start, end),
        "img_per_s_wall": round(sum(1 for a in answers if a[3].status_code == 200) / wall_s, 4),
        **latency_summary(in_window or answers), "errors_all": sum(1 for a in answers if a[3].status_code != 200),
        "gpus": gpu_summary(gpus, start, end),
    }
    return row, answers, gpus


def _delta(before: dict[str, dict], after: dict[str, dict], key: str, nested: Optional[str] = None) -> dict[str, float]:
    def get(stats: dict) -> float:
        return (stats.get(nested) or {}).get(key, 0) if nested else stats.get(key, 0)

    return {replica: round(get(stats) - get(before.get(replica, {})), 4) for replica, stats in after.items()}


# -- the parts ----------------------------------------------------------------------------------


def part_replicas(ctx) -> dict:
    args = ctx.args
    counts = args.replicas or sorted({n for n in (1, 2, 4, 8) if n <= ctx.slots} | {ctx.slots})
    rows = []
    part = {"counts": counts, "rows": rows}
    for n in counts:
        ready_s = deploy(ctx, base_only(args, ctx.app, num_replicas=n))
        warm_up(ctx, 2 * n)
        before = per_replica(BASE)
        row, _, _ = measure(ctx, args.clients_per_gpu * n, args.duration_s, ctx.body)
        after = per_replica(BASE, replicas=set(before))
        one = row["img_per_s"] if n == 1 else next((r["img_per_s"] for r in rows if r["replicas"] == 1), args.baseline_img_s)
        ratio = round(row["img_per_s"] / one, 3) if one and row["img_per_s"] else None
        rows.append({
            "replicas": n, "ready_s": ready_s, **row,
            "img_per_s_per_gpu": round(row["img_per_s"] / (n * args.engine_gpus), 4) if args.engine_gpus and row["img_per_s"] else None,
            "ratio_to_one": ratio, "goal": GOALS.get(n), "goal_met": (ratio >= GOALS[n]) if ratio and n in GOALS else None,
            "completed_per_replica": _delta(before, after, "completed"),
            "rows_per_forward": _rows_per_forward(before, after),
            "placement": placement().get(BASE, []),
        })
        print(f"  replicas {n}: {row['img_per_s']} img/s, ratio {ratio}", flush=True)
        ctx.save()
    print_replicas(part)
    return part


def _rows_per_forward(before: dict, after: dict) -> Optional[float]:
    forwards = sum(_delta(before, after, "forwards").values())
    return round(sum(_delta(before, after, "row_steps").values()) / forwards, 2) if forwards else None


def part_routing(ctx) -> dict:
    args = ctx.args
    adapters = ctx.loras(args.adapters)
    n = args.routing_replicas
    clients = args.routing_clients or args.clients_per_gpu * n

    def body(index: int) -> dict:
        name = adapters[random.Random(f"routing-{index}").randrange(len(adapters))]
        return {**ctx.body(index), "loras": [{"name": name, "weight": 0.8}]}

    rows = []
    part = {"replicas": n, "cache_size": args.cache_size, "adapters": len(adapters), "clients": clients, "rows": rows}
    for routing in args.routing_order:
        app = base_only(args, ctx.app, num_replicas=n)
        app["loras"] = {**app["loras"], "cache_size": args.cache_size, "routing": routing}
        ready_s = deploy(ctx, app)
        warm_up(ctx, 2 * n)  # plain requests: the LoRA caches stay empty
        before = per_replica(BASE)
        row, answers, _ = measure(ctx, clients, args.duration_s, body)
        after = per_replica(BASE, replicas=set(before))
        hits, loads = sum(_delta(before, after, "hits", "loras").values()), sum(_delta(before, after, "loads", "loras").values())
        minutes = row["wall_s"] / 60
        rows.append({
            "routing": routing, "ready_s": ready_s, **row,
            "hits": hits, "loads": loads, "evictions": sum(_delta(before, after, "evictions", "loras").values()),
            "hit_rate": round(hits / (hits + loads), 3) if hits + loads else None,
            "loads_per_min": round(loads / minutes, 2) if minutes else None,
            "load_s": round(sum(_delta(before, after, "load_s", "loras").values()), 3),
            "completed_per_replica": _delta(before, after, "completed"),
            "loads_per_replica": _delta(before, after, "loads", "loras"),
        })
        print(f"  routing {routing}: {row['img_per_s']} img/s, hit rate {rows[-1]['hit_rate']}", flush=True)
        ctx.save()
    if {r["routing"] for r in rows} == {"multiplexed", "any"}:
        ours, ray = (next(r for r in rows if r["routing"] == k) for k in ("multiplexed", "any"))
        part["multiplexed_over_any"] = {
            "img_per_s": round(ours["img_per_s"] / ray["img_per_s"], 3) if ours["img_per_s"] and ray["img_per_s"] else None,
            "loads": round(ours["loads"] / ray["loads"], 3) if ray["loads"] else None,
        }
    print_routing(part)
    return part


MIX_KINDS = ("base", "refiner", "controlnet", "hires")


def _kind(body: dict) -> str:
    return next((kind for kind in ("refiner", "controlnet", "hires") if kind in body), "base")


def part_graph(ctx) -> dict:
    args = ctx.args
    shipped = ctx.app
    roles = {"base": shipped["engine"], **{v: c["engine"] for v, c in (shipped.get("controlnets") or {}).items()}}
    if shipped.get("refiner"):
        roles["refiner"] = shipped["refiner"]["engine"]
    wanted = {role: _replicas_wanted(config) for role, config in roles.items()}
    for item in (args.graph_replicas or "").split(","):
        if item:
            role, count = item.split("=")
            wanted[role] = int(count)
    counts, gpus_each = fit_to_gpus(wanted, ctx.gpus, args.engine_gpus)
    app = copy.deepcopy(shipped)
    placed = {"num_gpus": gpus_each, "num_cpus": args.engine_cpus}
    app["engine"] = _engine(args, shipped, num_replicas=counts["base"], **placed)
    for variant in app.get("controlnets") or {}:
        app["controlnets"][variant]["engine"] = _engine(args, shipped, num_replicas=counts[variant], **placed)
    if app.get("refiner"):
        app["refiner"]["engine"] = _engine(args, shipped, num_replicas=counts["refiner"], **placed)
    hires_side = int(args.size * args.hires_scale) // 8 * 8
    optimize = app["model"].get("optimize", {})
    if optimize.get("compile", "off") != "off":  # a compiled replica compiles the hires size at warm-up, not at its first request
        optimize["warmup_sizes"] = [*optimize.get("warmup_sizes", []), [hires_side, hires_side]]
    controlnet = next((name for config in (app.get("controlnets") or {}).values() for name in config["models"]), None)
    adapters = ctx.loras(args.adapters)
    mix = {kind: float(share) for kind, share in (item.split("=") for item in args.mix.split(","))}
    if mix.get("controlnet") and controlnet is None:
        raise SystemExit("--mix asks for ControlNet requests but the config serves no ControlNet")
    if mix.get("refiner") and not app.get("refiner"):
        raise SystemExit("--mix asks for refined requests but the config serves no refiner")
    picture = np.zeros((args.size, args.size, 3), dtype=np.uint8)
    picture[args.size // 4 : 3 * args.size // 4, args.size // 4 : 3 * args.size // 4] = 255
    control = png_b64(picture)


    def body(index: int) -> dict:
        rng = random.Random(f"graph-{index}")
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
        request = ctx.body(index)
        if kind == "refiner":
            request["refiner"] = {}
        elif kind == "controlnet":
            request["controlnet"] = {"name": controlnet, "image": control}
        elif kind == "hires":
            request["hires"] = {"width": hires_side, "height": hires_side, "strength": 0.4}
        if rng.random() < args.lora_share:
            request["loras"] = [{"name": adapters[rng.randrange(len(adapters))], "weight": 1.0}]
        return request

    ready_s = deploy(ctx, app)
    where = placement()
    engines = sorted(name for name in where if name.startswith("SDXL"))
    gpus_used = sum(counts.values()) * gpus_each
    clients = max(1, round(args.clients_per_gpu * (gpus_used if gpus_each else sum(counts.values()))))
    warm_up(ctx, sum(counts.values()))
    before = {name: per_replica(name) for name in engines}
    row, answers, _ = measure(ctx, clients, args.graph_duration_s, body)
    after = {name: per_replica(name, replicas=set(before[name])) for name in engines}
    window = row["window_s"][1] - row["window_s"][0]
    kinds = {kind: latency_summary([a for a in answers if _kind(a[0]) == kind]) for kind in MIX_KINDS}
    with_loras = latency_summary([a for a in answers if "loras" in a[0]])
    part = {
        "counts": counts, "gpus_per_replica": gpus_each, "mix": mix, "hires_side": hires_side,
        "lora_share": round(sum(1 for a in answers if "loras" in a[0]) / max(1, len(answers)), 3),
        "ready_s": ready_s, **row, "by_kind": kinds, "with_loras": with_loras,
        "placement": {name: where[name] for name in engines},
        # The share of the run each deployment's replicas spent in forwards (busy), on average.
        "busy_share": {name: round(statistics.fmean(_delta(before[name], after[name], "forward_s").values()) / row["wall_s"], 3)
                       for name in engines if after[name]},
        "gpu_replicas": _replicas_by_gpu(where, engines),
        "window_requests": sum(1 for a in answers if row["window_s"][0] <= a[1] <= row["window_s"][1]),
        "window_len_s": round(window, 1),
    }
    print_graph(part)
    return part


def _replicas_by_gpu(where: dict, engines: list[str]) -> dict[str, list[str]]:
    by_gpu: dict[str, list[str]] = {}
    for name in engines:
        for replica in where[name]:
            for gpu in replica.get("gpu_ids", []):
                by_gpu.setdefault(str(gpu), []).append(name)
    return dict(sorted(by_gpu.items(), key=lambda item: int(item[0])))


def part_autoscale(ctx) -> dict:
    args = ctx.args
    shipped = (ctx.app["engine"].get("autoscaling") or {})
    maximum = args.autoscale_max or min(ctx.slots, shipped.get("max_replicas", 4))
    scaling = {
        "min_replicas": shipped.get("min_replicas", 1), "max_replicas": maximum,
        "target_ongoing_requests": args.target_ongoing or shipped.get("target_ongoing_requests", 8),
        "upscale_delay_s": args.upscale_delay_s if args.upscale_delay_s is not None else shipped.get("upscale_delay_s", 10),
        "downscale_delay_s": args.downscale_delay_s,
    }
    one_gpu = args.autoscale_clients_per_gpu or math.ceil(scaling["target_ongoing_requests"])
    step_gpus = args.step_gpus or min(4, maximum)
    levels = [(args.before_s, one_gpu), (args.step_s, one_gpu * step_gpus), (args.after_s, one_gpu)]
    ready_s = deploy(ctx, base_only(args, ctx.app, autoscaling=scaling))
    warm_up(ctx, one_gpu)
    starts: dict[str, dict] = {}
    asking = threading.Lock()

    def ask_starts() -> None:
        """Each running replica's start (load and warm-up seconds, compile-cache hits), asked
        beside the load while the replicas are up (they may be gone when it ends)."""
        try:
            for replica, info in per_replica(BASE, "model_info", tries=4 * max(1, len(starts) + 1)).items():
                starts.setdefault(replica, {key: info.get(key) for key in ("load_s", "warmup_s", "compile_cache")})
        except Exception:  # noqa: BLE001 - asked again at the next sample
            pass
        finally:
            asking.release()

    def sample() -> dict:
        counts = replica_counts()
        if counts.get("RUNNING", 0) > len(starts) and asking.acquire(blocking=False):
            threading.Thread(target=ask_starts, daemon=True).start()
        return counts

    with Sampler(sample, 0.5) as states, gpu_sampler() as gpus:
        answers, wall_s = run_load(ctx, levels, ctx.body)
        # The load has ended; keep watching until the replicas are back at the minimum.
        deadline = time.monotonic() + args.down_wait_s
        while time.monotonic() < deadline and _total(replica_counts()) > scaling["min_replicas"]:
            time.sleep(0.5)
    step_at, step_end = args.before_s, args.before_s + args.step_s
    at_step = _running_at(states.samples, step_at)
    ready_after = {}
    for k in range(at_step + 1, maximum + 1):
        first = next((at for at, counts in states.samples if at >= step_at and counts.get("RUNNING", 0) >= k), None)
        ready_after[k] = round(first - step_at, 1) if first is not None else None
    decided = next((at for at, counts in states.samples if at >= step_at and _total(counts) > at_step), None)
    down = next((at for at, counts in states.samples if at >= step_end and _total(counts) <= scaling["min_replicas"]), None)
    phases = {"before": (0, step_at), "step": (step_at, step_end), "after": (step_end, step_end + args.after_s)}
    part = {
        "autoscaling": scaling, "clients": {name: clients for name, (_, clients) in zip(phases, levels)}, "ready_s": ready_s,
        "running_at_step": at_step,
        "seconds_to_decide": round(decided - step_at, 1) if decided is not None else None,
        "seconds_until_running": ready_after,
        "seconds_to_scale_down": round(down - step_end, 1) if down is not None else None,
        # Replicas started again after the step (the autoscaler flapping at one GPU's worth).
        "starts_after_step": _starts_after(states.samples, step_end),
        "peak_running": max((counts.get("RUNNING", 0) for _, counts in states.samples), default=0),
        "phases": {name: {**latency_summary([a for a in answers if lo <= a[1] < hi]), "img_per_s": throughput(answers, lo, hi)}
                   for name, (lo, hi) in phases.items()},
        "img_per_s_per_10s": [throughput(answers, t, t + 10) for t in range(0, int(step_end + args.after_s) - 9, 10)],
        "replica_starts": starts,
        "states": _state_changes(states.samples),
        "gpus": {name: gpu_summary(gpus, lo, hi) for name, (lo, hi) in phases.items()},
        "wall_s": round(wall_s, 1),
    }
    print_autoscale(part)
    return part


def _total(counts: dict) -> int:
    return sum(count for state, count in counts.items() if state != "error")


def _running_at(samples: list, at: float) -> int:
    before = [counts.get("RUNNING", 0) for t, counts in samples if t <= at]
    return before[-1] if before else 1


def _starts_after(samples: list, at: float) -> int:
    """How many times the number of starting replicas rose after `at`."""
    rises, last = 0, 0
    for t, counts in samples:
        starting = counts.get("STARTING", 0)
        rises += t > at and starting > last
        last = starting
    return rises


def _state_changes(samples: list) -> list:
    """The replica-state samples where something changed: `[seconds, {state: count}]`."""
    changes, last = [], None
    for at, counts in samples:
        if counts != last:
            changes.append([at, counts])
            last = counts
    return changes


# -- tables -------------------------------------------------------------------------------------


def print_replicas(part: dict) -> None:
    print(f"{'replicas':>8}{'clients':>8}{'ready s':>8}{'img/s':>9}{'/GPU':>8}{'ratio':>7}{'goal':>6}{'p50 s':>8}{'p99 s':>8}"
          f"{'err':>5}{'rows/fwd':>9}  GPU util % (mean)")
    for r in part["rows"]:
        util = " ".join(f"{i}:{g['util_mean']:.0f}" for i, g in r["gpus"].items()) or "-"
        print(f"{r['replicas']:>8}{r['clients']:>8}{r['ready_s']:>8}{r['img_per_s']!s:>9}{r['img_per_s_per_gpu']!s:>8}"
              f"{r['ratio_to_one']!s:>7}{r['goal'] or '-'!s:>6}{r.get('p50_s', '-')!s:>8}{r.get('p99_s', '-')!s:>8}"
              f"{r['errors_all']:>5}{r['rows_per_forward']!s:>9}  {util}")


def print_routing(part: dict) -> None:
    print(f"routing: {part['adapters']} adapters over {part['replicas']} replicas caching {part['cache_size']}, {part['clients']} clients")
    print(f"{'routing':<12}{'img/s':>8}{'p50 s':>8}{'p99 s':>8}{'hits':>6}{'loads':>6}{'hit rate':>9}{'loads/min':>10}"
          f"{'evict':>6}  requests per replica")
    for r in part["rows"]:
        print(f"{r['routing']:<12}{r['img_per_s']!s:>8}{r.get('p50_s', '-')!s:>8}{r.get('p99_s', '-')!s:>8}{r['hits']:>6.0f}"
              f"{r['loads']:>6.0f}{r['hit_rate']!s:>9}{r['loads_per_min']!s:>10}{r['evictions']:>6.0f}  "
              f"{sorted(int(v) for v in r['completed_per_replica'].values())}")
    if "multiplexed_over_any" in part:
        print("multiplexed / any:", part["multiplexed_over_any"])


def print_graph(part: dict) -> None:
    print(f"graph: replicas {part['counts']} at {part['gpus_per_replica']} GPU each, {part['clients']} clients, "
          f"{part['img_per_s']} img/s, p50 {part.get('p50_s')} s, p99 {part.get('p99_s')} s, errors {part['errors_all']}")
    print(f"{'kind':<12}{'requests':>9}{'p50 s':>8}{'p99 s':>8}")
    for kind, s in [*part["by_kind"].items(), ("with LoRAs", part["with_loras"])]:
        print(f"{kind:<12}{s['requests']:>9}{s.get('p50_s', '-')!s:>8}{s.get('p99_s', '-')!s:>8}")
    for name, replicas in part["placement"].items():
        spots = ", ".join(f"{r['replica']}@{r.get('node_id', '?')[:8]}:GPU{r.get('gpu_ids') or '-'}" for r in replicas)
        print(f"  {name}: busy {part['busy_share'].get(name)} — {spots}")
    for index, g in part["gpus"].items():
        print(f"  GPU {index}: util {g['util_mean']}% (max {g['util_max']}), {g['memory_max_mib']:.0f} MiB, "
              f"{part['gpu_replicas'].get(index, [])}")


def print_autoscale(part: dict) -> None:
    s = part["autoscaling"]
    print(f"autoscale: min {s['min_replicas']} max {s['max_replicas']} target {s['target_ongoing_requests']} "
          f"up {s['upscale_delay_s']} s down {s['downscale_delay_s']} s; clients {part['clients']}")
    print(f"  running at the step {part['running_at_step']}; scale-up decided after {part['seconds_to_decide']} s; "
          f"replica k running after (s): {part['seconds_until_running']}; back to min {part['seconds_to_scale_down']} s after the step "
          f"({part['starts_after_step']} replica starts after it)")
    print(f"{'phase':<8}{'requests':>9}{'img/s':>8}{'p50 s':>8}{'p99 s':>8}")
    for name, p in part["phases"].items():
        print(f"{name:<8}{p['requests']:>9}{p['img_per_s']!s:>8}{p.get('p50_s', '-')!s:>8}{p.get('p99_s', '-')!s:>8}")
    print(f"  img/s per 10 s: {part['img_per_s_per_10s']}")
    print(f"  replica starts: {part['replica_starts']}")


# -- main ---------------------------------------------------------------------------------------


class Context:
    """What every part uses: the flags, the shipped app, the cluster's GPUs and URL, the report."""

    def __init__(self, args, report: dict, gpus: int):
        self.args, self.report, self.gpus = args, report, gpus
        #: Engine replicas the GPUs hold (CPU: 8, a bound for the default replica counts).
        self.slots = int(gpus / args.engine_gpus + 1e-9) if args.engine_gpus else 8
        self.app = shipped_app(args)
        self.url = f"http://127.0.0.1:{args.port}"
        self._loras: list[str] = []

    def body(self, index: int) -> dict:
        return {"prompt": "a red circle on a blue background", "width": self.args.size, "height": self.args.size,
                "num_inference_steps": self.args.steps, "seed": index}

    def loras(self, count: int) -> list[str]:
        """`count` random LoRAs in the app's registry (written once, from the base's UNet shapes)."""
        if len(self._loras) < count:
            arch = "tiny" if self.app["model"]["source"] == "tiny" else "sdxl-arch"
            self._loras = random_loras(Path(self.app["loras"]["dir"]), count, self.args.lora_rank, arch=arch, prefix="scaleout")
        return self._loras[:count]

    def save(self) -> None:
        (self.args.out / "bench_scaleout.json").write_text(json.dumps(self.report, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script: the tiny model, small and short (flags given win)")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["replicas", "routing", "graph", "autoscale"])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "serve_config.gpu.yaml")
    parser.add_argument("--model", help="JSON merged over the config's model (e.g. {\"source\": \"sdxl-arch\"})")
    parser.add_argument("--compile-cache", type=Path, help="compile cache folder (default <out>/compile-cache)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-batch-size", type=int, help="default: the config's")
    parser.add_argument("--engine-gpus", type=float, help="GPUs per engine replica (default 1 with CUDA, else 0)")
    parser.add_argument("--engine-cpus", type=float, help="CPUs per engine replica (default: the config's)")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--port", type=int, default=8126)
    parser.add_argument("--clients-per-gpu", type=int, default=16, help="closed-loop clients per replica (replicas, routing) or GPU (graph)")
    parser.add_argument("--duration-s", type=float, default=90, help="each replicas and routing measurement")
    # replicas
    parser.add_argument("--replicas", type=lambda s: [int(x) for x in s.split(",")], help="default 1, 2, 4, 8 up to the GPUs")
    parser.add_argument("--baseline-img-s", type=float, help="one replica's img/s when this run does not measure it")
    # routing
    parser.add_argument("--routing-replicas", type=int, default=4)
    parser.add_argument("--cache-size", type=int, default=8, help="LoRA sets each replica caches (loras.cache_size)")
    parser.add_argument("--adapters", type=int, default=30, help="random LoRAs the routing and graph requests pick from")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--routing-order", type=lambda s: s.split(","), default=["multiplexed", "any"])
    parser.add_argument("--routing-clients", type=int, help="closed-loop clients (default --clients-per-gpu per replica)")
    # graph
    parser.add_argument("--graph-replicas", help="role=count,... over the config's max_replicas (roles: base, <variant>, refiner)")
    parser.add_argument("--graph-duration-s", type=float, help="default --duration-s")
    parser.add_argument("--mix", default="base=0.5,refiner=0.2,controlnet=0.2,hires=0.1")
    parser.add_argument("--lora-share", type=float, default=0.5, help="of all requests, those naming a LoRA")
    parser.add_argument("--hires-scale", type=float, default=2.0)
    # autoscale
    parser.add_argument("--autoscale-max", type=int, help="max_replicas (default: the config's, at most the GPUs)")
    parser.add_argument("--target-ongoing", type=float, help="target_ongoing_requests (default: the config's)")
    parser.add_argument("--upscale-delay-s", type=float, help="default: the config's")
    parser.add_argument("--downscale-delay-s", type=float, default=60, help="the config's 600 s would outlast the run")
    parser.add_argument("--autoscale-clients-per-gpu", type=int, help="one GPU's worth of clients (default target_ongoing_requests)")
    parser.add_argument("--step-gpus", type=int, help="GPUs' worth of clients in the step (default 4, at most max_replicas)")
    parser.add_argument("--before-s", type=float, default=30)
    parser.add_argument("--step-s", type=float, default=180)
    parser.add_argument("--after-s", type=float, default=90)
    parser.add_argument("--down-wait-s", type=float, default=60, help="after the load, most seconds to wait for the minimum")
    parser.add_argument("--out", type=Path, required=True)
    if "--smoke" in sys.argv[1:]:
        parser.set_defaults(**SMOKE)  # flags given still win
    args = parser.parse_args()
    args.graph_duration_s = args.graph_duration_s or args.duration_s
    unknown = set(args.parts) - {"replicas", "routing", "graph", "autoscale"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}")

    import torch
    import yaml

    gpus = torch.cuda.device_count()
    args.engine_gpus = args.engine_gpus if args.engine_gpus is not None else (1.0 if gpus else 0.0)
    shipped_engine = yaml.safe_load(args.config.read_text())["applications"][0]["args"].get("engine", {})
    args.engine_cpus = args.engine_cpus if args.engine_cpus is not None else shipped_engine.get("num_cpus", 1)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {**run_header("bench_scaleout"), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    ctx = Context(args, report, gpus)
    report["app"] = ctx.app
    ctx.save()
    parts = {"replicas": part_replicas, "routing": part_routing, "graph": part_graph, "autoscale": part_autoscale}
    with cluster(args):
        for name in ("replicas", "routing", "graph", "autoscale"):
            if name in args.parts:
                print(f"== {name}", flush=True)
                report[name] = parts[name](ctx)
                ctx.save()
    print(f"wrote {args.out / 'bench_scaleout.json'}")


if __name__ == "__main__":
    main()
