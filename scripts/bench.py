"""Performance benchmarks of rope_ntk on the bundled model (issue 7).

Sections (``--only``, comma-separated; default: all), each measured side by
side in one process, in interleaved repetitions (A B, B A, A B, ... after an
untimed warm-up, so background load falls on both sides alike), median and
quartiles reported:

  overhead    forward time of a patched model / the unpatched one at the same
              length, and / transformers' own module built from the same
              ``rope_parameters`` (targets: <= 1.01 static, <= 1.02 dynamic)
  throughput  perplexity eval scored tokens/s / a bare ``model(input_ids)``
              over the same windows (target >= 0.95)
  memory      peak memory of the perplexity eval / the naive
              ``model(ids, labels=ids)``, each in a fresh subprocess (<= 0.4)
  bf16        bfloat16 weights (float32 RoPE phases) vs float32: speed and
              perplexity (target: within 1%)
  passkey     cost per trial; model forward calls counted with hooks
              (teacher-forced <= 1, generation reuses the prompt's prefill)
  growth      eval time and peak memory vs length, fitted t = a + b L + c L^2
  compile     torch.compile of a patched model vs eager

Writes OUT/report.md, OUT/results.json (raw numbers; re-running the same
command skips sections already there, ``--fresh`` recomputes) and PNG plots.

    .venv/bin/python scripts/bench.py --quick --out runs/bench   # smoke run, a few minutes
    .venv/bin/python scripts/bench.py                            # full run -> docs/bench/
    .venv/bin/python scripts/bench.py --only growth,memory       # some sections; later runs resume

The full run prints its expected duration at start (calibrated by one
forward); it is sized for about 25 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rope_ntk  # noqa: E402
from rope_ntk.evaluation import passkey as pk  # noqa: E402
from rope_ntk.evaluation.perplexity import hidden_nll, perplexity, resolve_bos, tokenize_stream, windows  # noqa: E402

SECTIONS = ("overhead", "throughput", "memory", "bf16", "passkey", "growth", "compile")
TARGETS = {"static": 1.01, "dynamic": 1.02, "throughput": 0.95, "memory": 0.4, "bf16_ppl": 0.01}

# what each section runs; --quick swaps in the second set
FULL = dict(
    overhead_lengths=(2048,), overhead_reps=5, overhead_past=9216, overhead_past_reps=2,
    throughput_length=4096, throughput_windows=2, throughput_reps=5,
    memory_lengths=(16384, 32768), growth_lengths=(2048, 4096, 8192, 16384, 32768),
    bf16_length=2048, bf16_windows=4, bf16_long=16384, bf16_reps=3,
    passkey=((4096, "yarn"), (9216, "dynamic-ntk")), compile_length=256, compile_reps=3,
)
QUICK = dict(
    overhead_lengths=(1024,), overhead_reps=3, overhead_past=None, overhead_past_reps=0,
    throughput_length=1024, throughput_windows=2, throughput_reps=3,
    memory_lengths=(2048, 4096), growth_lengths=(1024, 2048, 4096),
    bf16_length=1024, bf16_windows=2, bf16_long=None, bf16_reps=2,
    passkey=((1024, "yarn"),), compile_length=64, compile_reps=2,
)

# (label, kind, rope_ntk method, params, cache_consistent); the native twin is built from
# the rope_parameters rope_ntk records for the same patch (None: transformers has none)
VARIANTS = (
    ("linear x2", "static", "linear", {"factor": 2.0}, None),
    ("ntk x2", "static", "ntk", {"factor": 2.0}, None),
    ("yarn x2", "static", "yarn", {"factor": 2.0}, None),
    ("dynamic-ntk x2, consistent", "dynamic", "dynamic-ntk", {"factor": 2.0}, True),
    ("dynamic-ntk x2, legacy", "dynamic", "dynamic-ntk", {"factor": 2.0}, False),
)


# ------------------------------------------------------------------ measuring


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(values: list[float]) -> dict:
    """Median, quartiles, min and max of ``values``."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values),
            "n": len(values)}


def interleaved(sides: dict, reps: int, progress) -> dict[str, list[float]]:
    """Time every side ``reps`` times, A B A B ...; rep r runs them in an order rotated by r.

    ``sides``: name -> (setup, run); setup is not timed. Each side runs once untimed first
    (warm-up). Returns name -> seconds per rep.
    """
    names = list(sides)
    for setup, run in sides.values():
        setup()
        run()
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            setup, run = sides[name]
            setup()
            times[name].append(seconds(run))
            progress.update(1)
    return times


def ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Per rep, each side's time / the baseline's time in that rep; then their spread."""
    return {name: spread([t / b for t, b in zip(ts, times[baseline])]) for name, ts in times.items() if name != baseline}


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False if the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS is what is live
    except OSError:
        pass


# ------------------------------------------------------------------ model helpers


def native_rotary(model, method: str, params: dict):
    """transformers' own rotary module configured with what rope_ntk records for this patch."""
    rope_ntk.patch(model, method, cache_consistent=False, **params)
    rope = copy.deepcopy(model.config.rope_parameters)
    rope_ntk.unpatch(model)
    name, original = rope_ntk.find_rotary_modules(model)[0]
    config = copy.deepcopy(model.config)
    config.rope_parameters = rope
    module = type(original)(config=config).to(next(original.buffers()).device)
    return name, module  # built float32, so inv_freq stays float32 under a bfloat16 model


def set_module(model, name: str, module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


class ForwardCounter:
    """Counts calls of the model's forward and of its first decoder layer (one per pass over the stack)."""

    def __init__(self, model):
        self.calls, self.layer_calls = [], 0
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
        self.hooks = [
            model.register_forward_pre_hook(self._model, with_kwargs=True),
            layer.register_forward_pre_hook(self._layer),
        ]

    def _model(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append(int(ids.shape[-1]) if ids is not None else -1)

    def _layer(self, module, args):
        self.layer_calls += 1

    def remove(self):
        for hook in self.hooks:
            hook.remove()


# ------------------------------------------------------------------ sections


def bench_overhead(ctx, plan, progress) -> dict:
    model = ctx.model()
    name, original = rope_ntk.find_rotary_modules(model)[0]
    natives = {label: native_rotary(model, method, params)[1]
               for label, _, method, params, consistent in VARIANTS if consistent is not True}

    def use(label):
        def setup():
            rope_ntk.unpatch(model)
            set_module(model, name, original)
            if label == "unpatched":
                return
            if label.startswith("native "):
                set_module(model, name, natives[label[len("native "):]])
                return
            _, _, method, params, consistent = next(v for v in VARIANTS if v[0] == label)
            rope_ntk.patch(model, method, cache_consistent=consistent, **params)
        return setup

    def forward(ids):
        return lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)

    out = {"forward": "model(input_ids, use_cache=False, logits_to_keep=1), bfloat16", "lengths": {}}
    labels = ["unpatched"] + [v[0] for v in VARIANTS] + [f"native {k}" for k in natives]
    runs = [(length, labels, plan["overhead_reps"]) for length in plan["overhead_lengths"]]
    if plan["overhead_past"]:  # past the original length: dynamic methods only
        past = ["unpatched"] + [v[0] for v in VARIANTS if v[1] == "dynamic"] + ["native dynamic-ntk x2, legacy"]
        runs.append((plan["overhead_past"], past, plan["overhead_past_reps"]))
    with torch.no_grad():
        for length, chosen, reps in runs:
            ids = torch.tensor([ctx.stream[:length]])
            # each variant timed against the unpatched model in adjacent pairs (A B, B A, ...)
            pairs = {label: interleaved({"unpatched": (use("unpatched"), forward(ids)),
                                         label: (use(label), forward(ids))}, reps, progress)
                     for label in chosen if label != "unpatched"}
            per_rep = {label: [t / b for t, b in zip(p[label], p["unpatched"])] for label, p in pairs.items()}
            out["lengths"][str(length)] = {
                "seconds": {"unpatched": spread([t for p in pairs.values() for t in p["unpatched"]]),
                            **{label: spread(p[label]) for label, p in pairs.items()}},
                "ratio_vs_unpatched": {label: spread(r) for label, r in per_rep.items()},
                "ratio_vs_native": {
                    label: spread([a / b for a, b in zip(per_rep[label], per_rep[f"native {label}"])])
                    for label in per_rep if f"native {label}" in per_rep
                },
            }
            out["lengths"][str(length)]["rotary_ms"] = rotary_costs(model, name, chosen, use, ids)
            ctx.log(f"overhead at {length}: " + ", ".join(
                f"{k} {v['median']:.3f}" for k, v in out["lengths"][str(length)]["ratio_vs_unpatched"].items()))
    rope_ntk.unpatch(model)
    set_module(model, name, original)
    return out


def rotary_costs(model, name: str, chosen: list[str], use, ids: torch.Tensor, calls: int = 30) -> dict:
    """Milliseconds of what each variant adds to a forward, timed alone (median of ``calls``).

    The patch changes only the rotary module (and, for consistent dynamic methods, the
    decoder's forward, which first splits the input by scaling: ``chunk_bounds``), so
    (variant - unpatched) / forward bounds the overhead without the noise of whole forwards.
    """
    from rope_ntk import cache as kv

    x = torch.zeros(1, 1, dtype=next(model.parameters()).dtype)
    positions = torch.arange(ids.shape[1])[None]
    costs = {}
    for label in chosen:
        use(label)()
        module = model.get_submodule(name)
        rotaries = [m for m in model.modules() if isinstance(m, rope_ntk.ScaledRotaryEmbedding) and m.cache_consistent]

        def call():
            if rotaries:
                kv.chunk_bounds(rotaries, positions)
            module(x, positions)

        call()
        costs[label] = 1000 * statistics.median(seconds(call) for _ in range(calls))
    use("unpatched")()
    return costs


def bench_throughput(ctx, plan, progress) -> dict:
    model = ctx.model()
    length, count = plan["throughput_length"], plan["throughput_windows"]
    chosen = windows(ctx.stream, length, count, ctx.bos)
    scored = sum(len(w) - 1 for w in chosen)
    result = {}

    def bare():
        for window in chosen:
            model(torch.tensor([window]))

    with torch.no_grad():
        times = interleaved({
            "bare": (lambda: None, bare),
            "eval": (lambda: None, lambda: result.setdefault("ppl", perplexity(model, ctx.stream, length, count, ctx.bos))),
        }, plan["throughput_reps"], progress)
    ratio = spread([b / e for b, e in zip(times["bare"], times["eval"])])
    ctx.log(f"throughput eval / bare: {ratio['median']:.3f}")
    # the two differ only after the decoder: eval's chunked float32 loss vs bare's one projection
    # (and bare's KV cache); timed alone, those parts bound the ratio without the noise of forwards
    ids = torch.tensor([chosen[0]])
    with torch.no_grad():
        decoder = getattr(model, model.base_model_prefix)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        parts = interleaved({
            "eval loss": (lambda: None, lambda: hidden_nll(model, hidden, ids[0, 1:])),
            "bare projection": (lambda: None, lambda: model.get_output_embeddings()(hidden)),
            "decoder": (lambda: None, lambda: decoder(input_ids=ids, use_cache=False)),
        }, plan["throughput_reps"], progress)
    return {
        "length": length, "windows": count, "scored_tokens": scored,
        "bare": "model(torch.tensor([window])) for each window (full-vocabulary logits, default cache)",
        "tokens_per_s": {k: spread([scored / t for t in v]) for k, v in times.items()},
        "ratio_eval_vs_bare": ratio, "perplexity": result["ppl"].perplexity,
        "parts_seconds_one_window": {k: spread(v) for k, v in parts.items()},
    }


def run_worker(ctx, mode: str, length: int) -> dict:
    """One eval or naive forward in a fresh interpreter: its time and peak memory.

    Results are kept in results.json as they come (``workers``), so an interrupted
    run resumes after the last finished subprocess.
    """
    done = ctx.workers.get(f"{mode} {length}")
    if done is not None and not done.get("failed", "").startswith("exit"):  # crashes are retried
        return done
    result = _spawn(ctx, mode, length)
    ctx.workers[f"{mode} {length}"] = result
    ctx.save()
    return result


def naive_guard(length: int, vocab: int) -> str | None:
    """Why the naive loss must not run here, if its logits would not fit in the memory available now."""
    need = length * vocab * 11 / 2**30  # GiB: bf16 logits, their float32 copy, float32 log-probs (+10%)
    available = rss_free_gib()
    if need > available - 2:
        return (f"not run: the naive loss at {length} tokens needs about {need:.1f} GiB for its logits "
                f"(bfloat16 + float32 copy + float32 log-softmax) and only {available:.1f} GiB were available "
                "on this shared machine")
    return None


def rss_free_gib() -> float:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
    return int(line.split()[1]) / 2**20


def _spawn(ctx, mode: str, length: int) -> dict:
    if mode == "naive":
        why = naive_guard(length, ctx.model().config.vocab_size)
        if why:
            return {"mode": mode, "length": length, "failed": why}
    spec = {"mode": mode, "length": length, "threads": ctx.args.threads}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"mode": mode, "length": length, "failed": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(lines[-1])


WORKER_METHOD = ("yarn", {"factor": 4.0})  # 32768 = 4 x the bundled model's 8192


def worker(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    model, tokenizer = rope_ntk.load_model("bundled", dtype="bfloat16")
    rope_ntk.patch(model, WORKER_METHOD[0], **WORKER_METHOD[1])
    bos = resolve_bos(tokenizer, "auto")
    stream = tokenize_stream(tokenizer, rope_ntk.load_corpus("bundled"), spec["length"] + 1)
    window = windows(stream, spec["length"], 1, bos)[0]
    ids = torch.tensor([window])
    release_heap()
    baseline = rss_kib()
    exact = reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        if spec["mode"] == "eval":
            result = perplexity(model, stream, spec["length"], 1, bos)
            ppl = result.perplexity
        else:
            ppl = math.exp(model(ids, labels=ids).loss.item())
    elapsed = time.perf_counter() - start
    peak = rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "mode": spec["mode"], "length": spec["length"], "seconds": elapsed, "perplexity": ppl,
        "baseline_mib": baseline / 1024, "peak_mib": peak / 1024, "extra_mib": (peak - baseline) / 1024,
        "peak_source": "VmHWM after clear_refs" if exact else "ru_maxrss (whole process)",
    }))


def bench_memory(ctx, plan, progress) -> dict:
    rows = {}
    for length in plan["memory_lengths"]:
        for mode in ("eval", "naive"):
            rows[f"{mode} {length}"] = run_worker(ctx, mode, length)  # eval runs: those of growth
            progress.update(1)
        pair = rows[f"eval {length}"], rows[f"naive {length}"]
        if not any("failed" in r for r in pair):
            rows[f"ratio {length}"] = pair[0]["extra_mib"] / pair[1]["extra_mib"]
            ctx.log(f"memory at {length}: eval {pair[0]['extra_mib']:.0f} MiB, naive {pair[1]['extra_mib']:.0f} MiB")
    return {"method": f"{WORKER_METHOD[0]} x{WORKER_METHOD[1]['factor']:g}, bfloat16", "runs": rows}


def fit_quadratic(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a + b x + c x^2."""
    import numpy as np

    x = np.asarray(xs, dtype=float)
    design = np.stack([np.ones_like(x), x, x * x], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, np.asarray(ys, dtype=float), rcond=None)
    return {"a": float(a), "b": float(b), "c": float(c)}


def bench_growth(ctx, plan, progress) -> dict:
    runs = {}
    for length in plan["growth_lengths"]:
        runs[str(length)] = run_worker(ctx, "eval", length)
        progress.update(1)
        ctx.log(f"growth {length}: {runs[str(length)]}")
    ok = [(int(k), r) for k, r in runs.items() if "failed" not in r]
    out = {"method": f"{WORKER_METHOD[0]} x{WORKER_METHOD[1]['factor']:g}, bfloat16", "runs": runs}
    if len(ok) >= 3:
        out["fit_seconds"] = fit_quadratic([k for k, _ in ok], [r["seconds"] for _, r in ok])
        out["fit_mib"] = fit_quadratic([k for k, _ in ok], [r["extra_mib"] for _, r in ok])
    return out


def bench_bf16(ctx, plan, progress) -> dict:
    models = {"bfloat16": ctx.model(), "float32": ctx.model("float32")}
    length = plan["bf16_length"]
    ids = torch.tensor([ctx.stream[:length]])
    with torch.no_grad():
        times = interleaved({
            dtype: (lambda: None, lambda m=m: m(input_ids=ids, use_cache=False, logits_to_keep=1))
            for dtype, m in models.items()
        }, plan["bf16_reps"], progress)
        cells = [("none", {}, length, plan["bf16_windows"])]
        if plan["bf16_long"]:
            cells.append(("yarn", {"factor": 2.0}, plan["bf16_long"], 1))
        ppl = []
        for method, params, cell_length, count in cells:
            row = {"method": method, "params": params, "length": cell_length, "windows": count}
            for dtype, model in models.items():
                rope_ntk.patch(model, method, **params)
                row[dtype] = perplexity(model, ctx.stream, cell_length, count, ctx.bos).perplexity
                rope_ntk.unpatch(model)
                progress.update(1)
            row["relative_difference"] = row["bfloat16"] / row["float32"] - 1
            ppl.append(row)
            ctx.log(f"bf16 perplexity {row}")
    speed = spread([f / b for f, b in zip(times["float32"], times["bfloat16"])])
    return {"length": length, "speed_bf16_vs_fp32": speed, "seconds": {k: spread(v) for k, v in times.items()},
            "perplexity": ppl}


@torch.no_grad()
def teacher_forced_trial(model, tokenizer, prompt: pk.PasskeyPrompt) -> dict:
    """Score a passkey trial with one forward over prompt + key: correct if every key token is the argmax."""
    answer = tokenizer(" " + prompt.key, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt.input_ids + answer])
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(answer) + 1).logits[0, :-1]
    predicted = logits.argmax(-1).tolist()
    nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(answer), reduction="sum").item()
    return {"correct": predicted == answer, "key_nll": nll, "answer_tokens": len(answer)}


def bench_passkey(ctx, plan, progress) -> dict:
    model, tokenizer = ctx.model(), ctx.tokenizer
    rows = []
    for length, method in plan["passkey"]:
        rope_ntk.patch(model, method, factor=2.0)
        prompt = pk.build_prompt(tokenizer, length, 0.5, pk.trial_keys(0, length, [0.5])[0])
        row = {"length": length, "method": f"{method} x2", "prompt_tokens": len(prompt.input_ids)}
        for kind, trial in (("generation", lambda: pk.run_trial(model, tokenizer, prompt)),
                            ("teacher_forced", lambda: teacher_forced_trial(model, tokenizer, prompt))):
            counter = ForwardCounter(model)
            start = time.perf_counter()
            outcome = trial()
            row[kind] = {"seconds": time.perf_counter() - start, "model_forwards": len(counter.calls),
                         "tokens_per_forward": counter.calls, "stack_passes": counter.layer_calls,
                         "correct": outcome["correct"]}
            counter.remove()
            progress.update(1)
        rope_ntk.unpatch(model)
        rows.append(row)
        ctx.log(f"passkey {row}")
    return {"trials": rows}


def bench_compile(ctx, plan, progress) -> dict:
    if not any(Path(d, c).exists() for d in os.environ.get("PATH", "").split(":") for c in ("cc", "gcc", "clang")):
        return {"skipped": "no C compiler on PATH; torch.compile's inductor backend needs one"}
    model = ctx.model("float32")
    rope_ntk.patch(model, "yarn", factor=2.0)
    ids = torch.tensor([ctx.stream[: plan["compile_length"]]])
    compiled = torch.compile(model)
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        compile_s = seconds(lambda: compiled(input_ids=ids, use_cache=False))
        got = compiled(input_ids=ids, use_cache=False).logits
        progress.update(1)
        times = interleaved({
            "eager": (lambda: None, lambda: model(input_ids=ids, use_cache=False)),
            "compiled": (lambda: None, lambda: compiled(input_ids=ids, use_cache=False)),
        }, plan["compile_reps"], progress)
    rope_ntk.unpatch(model)
    diff = (got - eager).abs().max().item()
    return {"method": "yarn x2, float32", "length": plan["compile_length"], "compile_seconds": compile_s,
            "max_abs_logit_difference": diff, "max_abs_logit": eager.abs().max().item(), "tolerance": 1e-3,
            "matches": diff <= 1e-3, "argmax_agreement": (got.argmax(-1) == eager.argmax(-1)).float().mean().item(),
            "speed_compiled_vs_eager": spread([e / c for e, c in zip(times["eager"], times["compiled"])])}


BENCHES = {"overhead": bench_overhead, "throughput": bench_throughput, "memory": bench_memory,
           "bf16": bench_bf16, "passkey": bench_passkey, "growth": bench_growth, "compile": bench_compile}


def planned_steps(section: str, plan: dict) -> int:
    """Progress-bar units of a section (timed forwards, subprocesses, trials)."""
    if section == "overhead":
        n = len(plan["overhead_lengths"]) * plan["overhead_reps"] * 2 * (len(VARIANTS) + 4)
        return n + (plan["overhead_past_reps"] * 2 * 3 if plan["overhead_past"] else 0)
    return {
        "throughput": 5 * plan["throughput_reps"],
        "memory": 2 * len(plan["memory_lengths"]),
        "bf16": 2 * plan["bf16_reps"] + 2 * (1 + bool(plan["bf16_long"])),
        "passkey": 2 * len(plan["passkey"]),
        "growth": len(plan["growth_lengths"]),
        "compile": 1 + 2 * plan["compile_reps"],
    }[section]


def forward_seconds(length: int, scale: float) -> float:
    """Estimated bfloat16 forward time; the shape is fitted to README figures, ``scale`` calibrates it."""
    return scale * (3e-4 * length + 7e-8 * length * length)


def estimate(section: str, plan: dict, scale: float) -> float:
    f = lambda n: forward_seconds(n, scale)  # noqa: E731
    load = 10.0  # model load in a fresh subprocess
    if section == "overhead":  # pairs, plus one warm-up pair each
        n = sum((plan["overhead_reps"] + 1) * 2 * (len(VARIANTS) + 4) * f(L) for L in plan["overhead_lengths"])
        return n + ((plan["overhead_past_reps"] + 1) * 2 * 3 * 1.3 * f(plan["overhead_past"]) if plan["overhead_past"] else 0)
    if section == "throughput":
        return 2 * plan["throughput_reps"] * plan["throughput_windows"] * 1.2 * f(plan["throughput_length"])
    if section == "memory":  # the eval runs are reused from growth when it ran first
        return sum(load + 1.5 * f(L) for L in plan["memory_lengths"])
    if section == "growth":
        return sum(load + f(L) for L in plan["growth_lengths"])
    if section == "bf16":
        total = 2.5 * plan["bf16_reps"] * f(plan["bf16_length"]) + 2.5 * plan["bf16_windows"] * f(plan["bf16_length"])
        return total + (2.5 * f(plan["bf16_long"]) if plan["bf16_long"] else 0)
    if section == "passkey":
        return sum(4 * f(L) * (3 if m.startswith("dynamic") and L > 8192 else 1) for L, m in plan["passkey"])
    return 120.0  # compile: dominated by compiling the 30-layer graph


# ------------------------------------------------------------------ report


def machine_info(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    ram = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "ram_gib": round(ram / 2**20, 1),
            "amx_bf16": "amx_bf16" in flags, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "gpu": "none (no GPU machine was lent for this task)" if not torch.cuda.is_available() else "cuda"}



def report(results: dict) -> str:
    from bench_report import render  # noqa: PLC0415  (scripts/bench_report.py, next to this file)

    return render(results, TARGETS)


# ------------------------------------------------------------------ main


class Context:
    def __init__(self, args, results):
        self.args, self.results = args, results
        self._models = {}
        self.tokenizer = None
        self.stream = None
        self.bos = None

    def model(self, dtype: str = "bfloat16"):
        if dtype not in self._models:
            self._models[dtype], self.tokenizer = rope_ntk.load_model("bundled", dtype=dtype)
        return self._models[dtype]

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.everything, indent=1))

    def log(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"[{datetime.datetime.now():%H:%M:%S}] {message}")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections among {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="short lengths and few repetitions: a smoke run of a few minutes")
    parser.add_argument("--out", default=None, help="output directory (default: docs/bench, or runs/bench-quick with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    parser.add_argument("--fresh", action="store_true",
                        help="recompute: with --only, those sections (the others are kept); else the whole run")
    parser.add_argument("--before", default=None, help="results.json of a run on the code before the library "
                        "changes, for a before/after table (sections overhead, throughput, memory)")
    parser.add_argument("--after", default=None, help="results.json of the same command on the changed code "
                        "(default: this run)")
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md and plots from results.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        print(f"error: --only={args.only!r} names {', '.join(unknown)}; valid: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    chosen = [s for s in SECTIONS if s in chosen]  # growth feeds memory its eval runs: keep a fixed order
    if "growth" in chosen and "memory" in chosen:
        chosen.remove("growth")
        chosen.insert(chosen.index("memory"), "growth")
    out = Path(args.out or ("runs/bench-quick" if args.quick else "docs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.fresh and args.only and results.get("quick", args.quick) == args.quick:
        # --fresh --only X recomputes X and keeps the other sections of the run
        for section in chosen:
            results.get("sections", {}).pop(section, None)
        if {"growth", "memory"} & set(chosen):
            results.pop("workers", None)  # growth's eval runs feed memory
    elif args.fresh:
        results = {}
    plan = QUICK if args.quick else FULL
    if results.get("quick", args.quick) != args.quick:
        print(f"error: {results_path} holds a {'quick' if results['quick'] else 'full'} run; use --fresh "
              "or another --out", file=sys.stderr)
        return 2
    for side in ("before", "after"):
        if getattr(args, side):
            results[side] = {k: v for k, v in json.loads(Path(getattr(args, side)).read_text()).items()
                             if k in ("command", "sections", "date")}
    if args.report_only:
        return finish(out, results)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else ["scripts/bench.py", *argv]))
    if (args.fresh and set(chosen) == set(SECTIONS)) or not results.get("sections"):
        results.pop("notes", None)  # notes describe the run they were written for
    results.update(quick=args.quick, plan=plan, machine=machine_info(args.threads), command=command,
                   date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    results.setdefault("sections", {})
    ctx = Context(args, results["sections"])
    ctx.workers, ctx.path, ctx.everything = results.setdefault("workers", {}), results_path, results
    todo = [s for s in chosen if s not in results["sections"]]
    ctx.model()
    ctx.bos = resolve_bos(ctx.tokenizer, "auto")
    longest = max([*plan["growth_lengths"], *plan["memory_lengths"], 16384]) + 16
    ctx.stream = tokenize_stream(ctx.tokenizer, rope_ntk.load_corpus("bundled"), longest)
    with torch.no_grad():  # calibrate the duration estimate with one 2048-token forward
        probe = torch.tensor([ctx.stream[:2048]])
        ctx.model()(input_ids=probe, use_cache=False, logits_to_keep=1)
        scale = seconds(lambda: ctx.model()(input_ids=probe, use_cache=False, logits_to_keep=1)) / forward_seconds(2048, 1)
    scale *= args.threads / 2 if args.threads < 2 else 1  # the README figures were measured with 2 threads
    scale = max(scale, 1.0)
    expected = {s: estimate(s, plan, scale) for s in todo}
    ctx.log(f"sections to run: {', '.join(todo) or 'none (all in ' + str(results_path) + ')'}; "
            f"expected about {sum(expected.values()) / 60:.0f} min at the measured speed "
            f"({', '.join(f'{s} {v / 60:.1f}' for s, v in expected.items())})")
    from tqdm import tqdm

    for section in todo:
        with tqdm(total=planned_steps(section, plan), desc=section, unit="step") as progress:
            start = time.perf_counter()
            results["sections"][section] = BENCHES[section](ctx, plan, progress)
            results["sections"][section]["wall_seconds"] = time.perf_counter() - start
            results["sections"][section]["ran"] = f"{results['date']}: {command}"  # resumed runs mix commands
        write_atomic(results_path, json.dumps(results, indent=1))
        finish(out, results)
    return finish(out, results)


def finish(out: Path, results: dict) -> int:
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    try:
        from bench_report import plots

        plots(results, out)
    except ImportError as exc:  # matplotlib is optional
        print(f"no plots: {exc}", file=sys.stderr)
    write_atomic(out / "report.md", report(results))
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
