"""Markdown report and plots of ``scripts/bench.py``'s results.json (no measuring here)."""

from __future__ import annotations

from pathlib import Path


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _r(s: dict) -> str:
    """A ratio spread as 'median (q1-q3)'."""
    return f"{s['median']:.3f} ({s['q1']:.3f}-{s['q3']:.3f})"


def _overhead(sec: dict, targets: dict) -> list[str]:
    lines = [
        "## a. Patch overhead",
        "",
        f"Forward: `{sec['forward']}`, on the bundled model's first tokens of essay text. Each "
        "variant is timed against the unpatched model in adjacent pairs (A B, B A, A B, ...; one "
        "untimed warm-up pair first); a ratio is taken within a pair, then the median (quartiles) "
        "over pairs; ÷ native divides the two pair ratios of the same repetition. `native X` is "
        "transformers' own rotary module built from the `rope_parameters` rope_ntk records for X "
        "(static `ntk` as the default RoPE with the larger `rope_theta`).",
        "",
    ]
    for length, cell in sec["lengths"].items():
        lines += [f"### {length} tokens", "",
                  "| variant | seconds (median) | ÷ unpatched | ÷ native | target | |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        base = cell["seconds"]["unpatched"]["median"]
        lines.append(f"| unpatched | {base:.3f} | 1 | | | |")
        for label, ratio in cell["ratio_vs_unpatched"].items():
            seconds = cell["seconds"][label]["median"]
            native = cell["ratio_vs_native"].get(label)
            if label.startswith("native "):
                lines.append(f"| {label} | {seconds:.3f} | {_r(ratio)} | | | |")
                continue
            kind = "dynamic" if label.startswith("dynamic") else "static"
            target = targets[kind]
            past = int(length) > 8192
            check = "" if past and "consistent" in label else _met(ratio["median"] <= target)
            lines.append(f"| {label} | {seconds:.3f} | {_r(ratio)} | {_r(native) if native else ''} "
                         f"| ≤ {target} | {check} |")
        lines.append("")
        costs = cell.get("rotary_ms")
        if costs:
            forward = 1000 * base
            lines += [
                "What each variant adds, timed alone (noise-free bound on the overhead): one call of the "
                "rotary module the model runs (plus `chunk_bounds` for the consistent mode), median of 30, "
                f"against the {forward:.0f} ms forward:", "",
                "| variant | rotary call ms | (variant − unpatched) ÷ forward |", "| --- | ---: | ---: |",
                *[f"| {label} | {ms:.3f} | {(ms - costs['unpatched']) / forward:+.5%} |" for label, ms in costs.items()],
                "",
            ]
        if int(length) > 8192:
            lines += ["Past the original 8192 tokens the consistent mode computes something else than one "
                      "forward: every token with the scaling of its own prefix, as consecutive chunks of "
                      "`step` = 128 tokens through a KV cache whose keys are re-rotated at each chunk "
                      "(see the README, *Cache-consistent dynamic scaling*). Its ratio is the price of "
                      "that causal semantics, not patch overhead, so no target applies; the legacy mode "
                      "(one scaling per forward, as transformers) is the like-for-like row.", ""]
    return lines


def _throughput(sec: dict, targets: dict) -> list[str]:
    r = sec["ratio_eval_vs_bare"]
    tps = sec["tokens_per_s"]
    return [
        "## b. Perplexity eval throughput",
        "",
        f"{sec['windows']} windows of {sec['length']} tokens ({sec['scored_tokens']} scored tokens), "
        f"unpatched bfloat16 model. Eval: `rope_ntk.evaluation.perplexity.perplexity` (decoder without a "
        f"KV cache, logits projected 1024 positions at a time, float32 cross-entropy). Bare: {sec['bare']}.",
        "",
        "| | scored tokens/s (median) |",
        "| --- | ---: |",
        f"| bare forward | {tps['bare']['median']:.0f} |",
        f"| perplexity eval | {tps['eval']['median']:.0f} |",
        "",
        f"Eval ÷ bare: **{_r(r)}** (target ≥ {targets['throughput']}: {_met(r['median'] >= targets['throughput'])}). "
        f"Perplexity {sec['perplexity']:.3f}.",
        "",
    ] + _parts(sec)


def _parts(sec: dict) -> list[str]:
    parts = sec.get("parts_seconds_one_window")
    if not parts:
        return []
    d, loss, proj = (parts[k]["median"] for k in ("decoder", "eval loss", "bare projection"))
    return [
        "The two differ only after the decoder, so those parts were also timed alone on one window "
        f"(median): decoder {d:.3f} s, eval's chunked float32 loss (projection included) {loss:.3f} s, "
        f"bare's full-vocabulary projection {proj:.3f} s. Bound from the parts: eval ÷ bare ≈ "
        f"(decoder + projection) ÷ (decoder + loss) = **{(d + proj) / (d + loss):.3f}** "
        "(bare's KV-cache copy, which eval skips, not counted).",
        "",
    ]


def _memory(sec: dict, targets: dict) -> list[str]:
    lines = [
        "## c. Peak memory of the perplexity eval",
        "",
        f"Model {sec['method']}. Each run is a fresh Python process: load the model, tokenize, "
        "`malloc_trim`, read the resident set (VmRSS) as the baseline, reset the kernel's peak mark "
        "(`/proc/self/clear_refs` = 5), run one window, read the peak resident set (VmHWM). Reported: "
        "peak − baseline, i.e. the memory the computation itself adds on top of the loaded model and "
        "the token ids. Naive: `model(ids, labels=ids)`, which materialises full-vocabulary logits "
        "(bfloat16, then float32 inside the loss).",
        "",
        "| tokens | eval: extra MiB | naive: extra MiB | eval ÷ naive | target | | eval s | naive s | perplexity eval / naive |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    runs = sec["runs"]
    lengths = sorted({int(k.split()[1]) for k in runs if not k.startswith("ratio")})
    for n in lengths:
        e, v = runs[f"eval {n}"], runs[f"naive {n}"]
        if "failed" in e or "failed" in v:
            ev = f"{e['extra_mib']:.0f}" if "extra_mib" in e else e["failed"]
            nv = f"{v['extra_mib']:.0f}" if "extra_mib" in v else v["failed"]
            lines.append(f"| {n} | {ev} | {nv} | | | | {e.get('seconds', 0):.1f} | | |")
            continue
        ratio = runs[f"ratio {n}"]
        lines.append(
            f"| {n} | {e['extra_mib']:.0f} | {v['extra_mib']:.0f} | **{ratio:.3f}** | ≤ {targets['memory']} "
            f"| {_met(ratio <= targets['memory'])} | {e['seconds']:.1f} | {v['seconds']:.1f} "
            f"| {e['perplexity']:.3f} / {v['perplexity']:.3f} |"
        )
    peaks = [f"{n}: {runs[f'eval {n}']['peak_mib'] / 1024:.2f} GiB" for n in lengths if "peak_mib" in runs[f"eval {n}"]]
    lines += ["", f"Whole-process peak resident set of the eval: {', '.join(peaks)}.", ""]
    return lines


def _growth(sec: dict) -> list[str]:
    lines = [
        "## f. Cost growth with length",
        "",
        f"One perplexity window per length, {sec['method']}, fresh process each (as in c).",
        "",
        "| tokens | seconds | extra MiB | scored tokens/s |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for n, r in sec["runs"].items():
        if "failed" in r:
            lines.append(f"| {n} | {r['failed']} | | |")
        else:
            lines.append(f"| {n} | {r['seconds']:.2f} | {r['extra_mib']:.0f} | {(int(n) - 1) / r['seconds']:.0f} |")
    if "fit_seconds" in sec:
        t, m = sec["fit_seconds"], sec["fit_mib"]
        top = max(int(n) for n in sec["runs"])
        lines += [
            "",
            "Least squares fits over the lengths above (L in tokens):",
            "",
            f"- time: t = {t['a']:.3g} + {t['b']:.3g}·L + {t['c']:.3g}·L² s; at L = {top} the linear part "
            f"is {t['b'] * top:.1f} s and the quadratic part {t['c'] * top * top:.1f} s;",
            f"- memory: m = {m['a']:.3g} + {m['b']:.3g}·L + {m['c']:.3g}·L² MiB "
            f"({m['b'] * 1024:.1f} MiB per 1024 tokens linear; quadratic part at {top}: "
            f"{m['c'] * top * top:.0f} MiB).",
            "",
            "![eval time and peak memory vs length](growth.png)",
        ]
    return lines + [""]


def _bf16(sec: dict, targets: dict) -> list[str]:
    s = sec["speed_bf16_vs_fp32"]
    lines = [
        "## d. bfloat16 path vs float32",
        "",
        f"bfloat16 weights with float32 RoPE phases (`rope_ntk.load_model(dtype='bfloat16')`) against "
        f"the float32 model. Forward at {sec['length']} tokens: float32 "
        f"{sec['seconds']['float32']['median']:.2f} s, bfloat16 {sec['seconds']['bfloat16']['median']:.2f} s; "
        f"bfloat16 speed ÷ float32 speed: **{_r(s)}**.",
        "",
        "| RoPE | length | windows | perplexity float32 | perplexity bfloat16 | difference | target | |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in sec["perplexity"]:
        d = row["relative_difference"]
        name = row["method"] + (f" x{row['params']['factor']:g}" if row["params"] else "")
        lines.append(f"| {name} | {row['length']} | {row['windows']} | {row['float32']:.4f} | {row['bfloat16']:.4f} "
                     f"| {100 * d:+.2f}% | ±{100 * targets['bf16_ppl']:g}% | {_met(abs(d) <= targets['bf16_ppl'])} |")
    return lines + [""]


def _passkey(sec: dict) -> list[str]:
    lines = [
        "## e. Passkey cost per trial",
        "",
        "One trial (key at depth 0.5). Forward calls are counted with hooks, not timing: `model "
        "forwards` = calls of the CausalLM's forward, with the tokens each was fed; `stack passes` = "
        "calls of the first decoder layer (a cache-consistent dynamic prefill past 8192 runs the stack "
        "once per chunk inside one model forward). Generation is `rope_ntk.evaluation.passkey.run_trial` "
        "(greedy, 10 new tokens, KV cache); teacher-forced is one forward over prompt + key, correct "
        "when every key token is the argmax. The needle eval does not exist on this branch (issue 5), "
        "so passkey only.",
        "",
        "| RoPE | prompt tokens | scoring | seconds | model forwards | tokens per forward | stack passes | correct |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for row in sec["trials"]:
        for kind in ("generation", "teacher_forced"):
            r = row[kind]
            fed = r["tokens_per_forward"]
            shown = f"{fed[0]}, then {len(fed) - 1} × {fed[1]}" if len(fed) > 1 and len(set(fed[1:])) == 1 else str(fed)
            lines.append(f"| {row['method']} | {row['prompt_tokens']} | {kind.replace('_', '-')} | {r['seconds']:.2f} "
                         f"| {r['model_forwards']} | {shown} | {r['stack_passes']} | {r['correct']} |")
    return lines + [
        "",
        "Teacher-forced scoring takes exactly 1 forward per trial (target ≤ 1: met when the column says 1). "
        "Generation feeds the prompt once (the prefill) and then one token per forward: the prompt's "
        "keys and values are reused from the cache, never recomputed.",
        "",
    ]


def _compile(sec: dict) -> list[str]:
    if "skipped" in sec:
        return ["## g. torch.compile", "", f"Skipped: {sec['skipped']}.", ""]
    s = sec["speed_compiled_vs_eager"]
    return [
        "## g. torch.compile",
        "",
        f"`torch.compile(model)` (inductor, default mode) of the bundled model patched with {sec['method']}, "
        f"{sec['length']} tokens: first call (compilation) {sec['compile_seconds']:.0f} s; max |logit "
        f"difference| vs eager {sec['max_abs_logit_difference']:.2e} (largest |logit| "
        f"{sec['max_abs_logit']:.1f}; tolerance {sec['tolerance']:g}: "
        f"{'matches' if sec['matches'] else '**does not match**'}); argmax agreement "
        f"{100 * sec['argmax_agreement']:.1f}%; compiled speed ÷ eager {_r(s)}. `tests/test_compile.py` "
        "checks the same on a tiny model, and that the static rotary module compiles with "
        "`fullgraph=True` (no graph break).",
        "",
        "Dynamic methods read the current length as a Python number (`position_ids.max()`), so "
        "dynamo breaks the graph there and guards on it: one recompilation per distinct scaling "
        "length (at most one per `step` past the original context), and past torch's "
        "`recompile_limit` (8) the rotary call falls back to eager. The logits stay right (checked on "
        "the tiny model while developing), only the speed-up is lost for those calls.",
        "",
    ]


def _before(results: dict) -> list[str]:
    before = results.get("before", {}).get("sections", {})
    after = results.get("after", results).get("sections", {})
    if not before or not after:
        return []
    lines = ["## Before / after the library changes", "",
             f"Both with `{results['before'].get('command', '')}`, once on the code before the changes "
             "(parent commit), once after, back to back on the same machine.", "",
             "| measure | before | after |", "| --- | ---: | ---: |"]
    for length, cell in after.get("overhead", {}).get("lengths", {}).items():
        old = before.get("overhead", {}).get("lengths", {}).get(length, {}).get("ratio_vs_unpatched", {})
        for label, ratio in cell["ratio_vs_unpatched"].items():
            if label in old and not label.startswith("native"):
                lines.append(f"| overhead {label}, {length} tokens | {old[label]['median']:.3f} | {ratio['median']:.3f} |")
    if "throughput" in before and "throughput" in after:
        lines.append(f"| eval ÷ bare throughput | {before['throughput']['ratio_eval_vs_bare']['median']:.3f} | "
                     f"{after['throughput']['ratio_eval_vs_bare']['median']:.3f} |")
    for key, run in after.get("memory", {}).get("runs", {}).items():
        old = before.get("memory", {}).get("runs", {}).get(key)
        if old is not None and not key.startswith("ratio") and "extra_mib" in run and "extra_mib" in old:
            lines.append(f"| {key} tokens: extra MiB | {old['extra_mib']:.0f} | {run['extra_mib']:.0f} |")
            lines.append(f"| {key} tokens: seconds | {old['seconds']:.2f} | {run['seconds']:.2f} |")
    return lines + [""]


def render(results: dict, targets: dict) -> str:
    m = results["machine"]
    sec = results.get("sections", {})
    lines = [
        "# rope_ntk performance benchmarks",
        "",
        f"Generated by `{results['command']}` on {results['date']}"
        + (" (**--quick**: smoke settings, not the full benchmark)" if results.get("quick") else "") + ".",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, AMX-BF16 {'yes' if m['amx_bf16'] else 'no'}, "
        f"torch threads {m['torch_threads']}; Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}; {m['platform']}. GPU: {m['gpu']} — so there is no GPU table; absolute times "
        "here are those of a small CPU.",
        "",
        "This machine is shared with other jobs (up to seven sessions on two cores), so absolute times are "
        "noisy; the ratios are measured side by side in interleaved repetitions so that background load "
        "falls on both sides alike, and the spread is shown. Re-run on a quiet machine with "
        "`python scripts/bench.py --fresh` (sections are saved as they finish; re-running without "
        "`--fresh` resumes). Model: bundled SmolLM2-135M-Instruct (30 layers, head_dim 64, "
        "rope_theta 1e5, original context 8192), bfloat16 unless stated; text: bundled Paul Graham essays. "
        "Raw numbers: [results.json](results.json).",
        "",
    ]
    lines += _summary(sec, targets)
    parts = (("overhead", lambda x: _overhead(x, targets)), ("throughput", lambda x: _throughput(x, targets)),
             ("memory", lambda x: _memory(x, targets)), ("bf16", lambda x: _bf16(x, targets)),
             ("passkey", _passkey), ("growth", _growth), ("compile", _compile))
    for name, part in parts:
        if name not in sec:
            continue
        body = part(sec[name])
        if "--quick" in sec[name].get("ran", "") and not results.get("quick"):
            body[1:1] = ["", f"*Measured with `--quick` settings ({sec[name]['ran']}), not the full ones.*"]
        lines += body
    missing = [name for name, _ in parts if name not in sec]
    if missing:
        lines += [f"Not measured in this report: {', '.join(missing)}.", ""]
    lines += _before(results)
    walls = ", ".join(f"{k} {v.get('wall_seconds', 0) / 60:.1f}" for k, v in sec.items())
    lines += [f"Wall time per section (minutes): {walls}.", ""]
    if results.get("notes"):  # written by hand about one run; kept in results.json with it
        lines += ["## Notes on this run", "", *[f"- {note}" for note in results["notes"]], ""]
    ran = sorted({v["ran"] for v in sec.values() if "ran" in v})
    if len(ran) > 1:
        lines += ["Sections were computed by these invocations (each resuming the same results.json):", "",
                  *[f"- {r}" for r in ran], ""]
    return "\n".join(lines)


def _summary(sec: dict, targets: dict) -> list[str]:
    rows = []

    def quick(name: str) -> str:
        return " (--quick)" if "--quick" in sec.get(name, {}).get("ran", "") else ""

    for length, cell in sec.get("overhead", {}).get("lengths", {}).items():
        for label, ratio in cell["ratio_vs_unpatched"].items():
            if label.startswith("native") or (int(length) > 8192 and "consistent" in label):
                continue
            target = targets["dynamic" if label.startswith("dynamic") else "static"]
            rows.append((f"patch overhead, {label}, {length} tokens{quick('overhead')}", f"{ratio['median']:.3f}", f"≤ {target}",
                         _met(ratio["median"] <= target)))
    for length, cell in sec.get("overhead", {}).get("lengths", {}).items():
        costs, forward = cell.get("rotary_ms"), 1000 * cell["seconds"]["unpatched"]["median"]
        for label, ms in (costs or {}).items():
            if label == "unpatched" or label.startswith("native"):
                continue
            bound = 1 + (ms - costs["unpatched"]) / forward
            target = targets["dynamic" if label.startswith("dynamic") else "static"]
            rows.append((f"patch overhead from the rotary call alone, {label}, {length} tokens{quick('overhead')}",
                         f"{bound:.5f}", f"≤ {target}", _met(bound <= target)))
    if "throughput" in sec:
        r = sec["throughput"]["ratio_eval_vs_bare"]["median"]
        rows.append((f"eval ÷ bare forward, scored tokens/s{quick('throughput')}", f"{r:.3f}", f"≥ {targets['throughput']}",
                     _met(r >= targets["throughput"])))
    for key, value in sec.get("memory", {}).get("runs", {}).items():
        if key.startswith("ratio"):
            rows.append((f"peak memory eval ÷ naive, {key.split()[1]} tokens", f"{value:.3f}",
                         f"≤ {targets['memory']}", _met(value <= targets["memory"])))
    memory = sec.get("memory", {}).get("runs", {})
    for key, run in memory.items():
        length = key.split()[-1]
        if key.startswith("eval") and f"ratio {length}" not in memory and "peak_mib" in run:
            rows.append((f"perplexity eval at {length} tokens (naive not measured)",
                         f"{run['extra_mib']:.0f} MiB extra, {run['peak_mib'] / 1024:.2f} GiB process peak",
                         "runs in 24 GiB", _met(run["peak_mib"] < 24 * 1024)))
    if "bf16" in sec:
        for row in sec["bf16"]["perplexity"]:
            d = row["relative_difference"]
            rows.append((f"bf16 vs fp32 perplexity, {row['method']}, {row['length']}{quick('bf16')}", f"{100 * d:+.2f}%",
                         f"±{100 * targets['bf16_ppl']:g}%", _met(abs(d) <= targets["bf16_ppl"])))
    for row in sec.get("passkey", {}).get("trials", []):
        n = row["teacher_forced"]["model_forwards"]
        rows.append((f"passkey teacher-forced forwards, {row['method']}, {row['length']}{quick('passkey')}", str(n), "≤ 1", _met(n <= 1)))
    if "bf16" in sec:
        s = sec["bf16"]["speed_bf16_vs_fp32"]["median"]
        rows.append((f"bf16 speed ÷ fp32 speed, {sec['bf16']['length']} tokens{quick('bf16')}", f"{s:.2f}", "reported", ""))
    if "compile" in sec and "matches" in sec["compile"]:
        c = sec["compile"]
        rows.append((f"torch.compile vs eager, max abs logit difference{quick('compile')}", f"{c['max_abs_logit_difference']:.1e}",
                     f"≤ {c['tolerance']:g}", _met(c["matches"])))
    if not rows:
        return []
    return ["## Targets", "", "| measure | measured | target | |", "| --- | ---: | ---: | --- |",
            *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows], ""]


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sec = results.get("sections", {})
    growth = sec.get("growth")
    if growth and "fit_seconds" in growth:
        runs = [(int(n), r) for n, r in growth["runs"].items() if "failed" not in r]
        xs = [n for n, _ in runs]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, fit, unit in ((axes[0], "seconds", growth["fit_seconds"], "seconds"),
                                   (axes[1], "extra_mib", growth["fit_mib"], "peak extra memory (MiB)")):
            ax.plot(xs, [r[key] for _, r in runs], "o", label="measured")
            grid = [min(xs) + i * (max(xs) - min(xs)) / 100 for i in range(101)]
            ax.plot(grid, [fit["a"] + fit["b"] * x + fit["c"] * x * x for x in grid], "-",
                    label=f"fit {fit['a']:.3g} + {fit['b']:.3g}L + {fit['c']:.3g}L²")
            ax.plot(grid, [fit["a"] + fit["b"] * x for x in grid], ":", label="linear part")
            ax.set_xlabel("window length L (tokens)")
            ax.set_ylabel(unit)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        memory = sec.get("memory", {}).get("runs", {})
        naive = [(int(k.split()[1]), r["extra_mib"]) for k, r in memory.items() if k.startswith("naive") and "extra_mib" in r]
        if naive:
            axes[1].plot([n for n, _ in naive], [m for _, m in naive], "s", color="tab:red",
                         label="naive model(ids, labels=ids)")
            axes[1].legend(fontsize=7)
        fig.suptitle("perplexity eval cost vs length (bundled SmolLM2-135M, bfloat16)")
        fig.tight_layout()
        fig.savefig(out / "growth.png", dpi=110)
        plt.close(fig)
    overhead = sec.get("overhead")
    if overhead:
        fig, ax = plt.subplots(figsize=(9, 4))
        labels, medians, lows, highs = [], [], [], []
        for length, cell in overhead["lengths"].items():
            for label, r in cell["ratio_vs_unpatched"].items():
                labels.append(f"{label}\n@{length}")
                medians.append(r["median"])
                lows.append(r["median"] - r["q1"])
                highs.append(r["q3"] - r["median"])
        ax.bar(range(len(labels)), medians, yerr=[lows, highs], capsize=3)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("forward time ÷ unpatched")
        ax.set_title("patch overhead: median and quartiles of pair ratios", fontsize=9)
        ax.set_ylim(min(0.9, min(m - lo for m, lo in zip(medians, lows)) - 0.02), max(1.1, max(m + hi for m, hi in zip(medians, highs)) + 0.02))
        fig.tight_layout()
        fig.savefig(out / "overhead.png", dpi=110)
        plt.close(fig)
