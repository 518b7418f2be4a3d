"""Benchmark cache-consistent dynamic scaling on the bundled model (issue 4).

Two measurements, written as one markdown report:

* speed: ``model.generate`` from a prompt of ``--prefill`` essay tokens for
  ``--decode`` greedy tokens, crossing the original context (8192 for the
  bundled SmolLM2-135M). Decoding tokens/s are timed between the first and
  the last new token (a stopping criterion stamps each step), so the prefill
  is not counted; it is reported apart. Static ``ntk`` is the baseline.
* accuracy: perplexity of incremental decoding, teacher-forced token by
  token through a KV cache from ``--prefill`` to ``--prefill + --ppl-tokens``,
  the tokens past the original length scored apart. Compared: the unscaled
  model, the legacy dynamic mode (transformers' behaviour: cached keys keep
  the rotation they were written with), and the cache-consistent mode at
  several ``step`` values.

    .venv/bin/python scripts/bench_dynamic_cache.py --out docs/bench_dynamic_cache.md
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, StoppingCriteria

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rope_ntk  # noqa: E402
from rope_ntk.evaluation.perplexity import tokenize_stream  # noqa: E402


class Clock(StoppingCriteria):
    """Never stops; stamps the time each new token is ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def apply(model, mode: str, factor: float, step: int | None):
    """Patch ``model`` for one row of the tables; return its label."""
    rope_ntk.unpatch(model)
    if mode == "none":
        return "unscaled"
    if mode == "static":
        rope_ntk.patch(model, "ntk", factor=factor)
        return f"static ntk, factor {factor:g}"
    method, consistent = mode.split(":")
    params = {"factor": factor} if method == "dynamic-ntk" else {}
    if step is not None:
        params["step"] = step
    rope_ntk.patch(model, method, cache_consistent=consistent == "consistent", **params)
    rotary = next(m for m in model.modules() if isinstance(m, rope_ntk.ScaledRotaryEmbedding))
    return f"{method}, {consistent}, step {rotary.step}"


@torch.no_grad()
def decode_speed(model, ids: torch.Tensor, new_tokens: int, pad_id: int) -> tuple[float, float]:
    """(prefill + first token seconds, decoding tokens/s after the first token)."""
    clock = Clock()
    start = time.perf_counter()
    model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        stopping_criteria=[clock], pad_token_id=pad_id,
    )
    return clock.times[0] - start, (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


@torch.no_grad()
def incremental_nll(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """NLL of tokens prefill .. end, each predicted from a KV cache fed one token at a time."""
    cache = DynamicCache(config=model.config)
    logits = model(ids[:, :prefill], cache=cache, logits_to_keep=1).logits[:, -1]
    nll = []
    for t in range(prefill, ids.shape[1]):
        nll.append(torch.nn.functional.cross_entropy(logits.float(), ids[:, t]))
        if t + 1 < ids.shape[1]:
            logits = model(ids[:, t : t + 1], cache=cache).logits[:, -1]
    return torch.stack(nll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=int, default=8000, help="prompt tokens (below the original 8192)")
    parser.add_argument("--decode", type=int, default=400, help="greedy tokens generated for the speed table")
    parser.add_argument("--ppl-tokens", type=int, default=800, help="teacher-forced tokens for the accuracy table")
    parser.add_argument("--factor", type=float, default=2.0, help="factor of dynamic-ntk and of the static baseline")
    parser.add_argument("--steps", default="1,128,512", help="step values of the consistent mode in the accuracy table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core machine)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="docs/bench_dynamic_cache.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    model, tokenizer = rope_ntk.load_model("bundled", dtype=args.dtype)
    original = model.config.max_position_embeddings
    stream = tokenize_stream(tokenizer, rope_ntk.load_corpus(), args.prefill + max(args.decode, args.ppl_tokens))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lines = [
        "# Cache-consistent dynamic scaling: speed and accuracy",
        "",
        f"Model: bundled SmolLM2-135M-Instruct ({args.dtype}, original context {original}), corpus: bundled "
        f"Paul Graham essays. torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} CPU threads ({platform.processor() or platform.machine()}).",
        "",
        f"Command: `{command}`",
        "",
        f"## Decoding speed: prompt {args.prefill} tokens, {args.decode} generated (to position "
        f"{args.prefill + args.decode - 1}, past {original})",
        "",
        "| RoPE | prefill + first token (s) | decoding tokens/s | vs static |",
        "| --- | ---: | ---: | ---: |",
    ]
    ids = torch.tensor([stream[: args.prefill]])
    speed_rows = [("static", None), ("dynamic-ntk:consistent", None), ("dynamic-ntk:legacy", None),
                  ("dynamic-ntk:consistent", 1)]
    static_rate = None
    for mode, step in speed_rows:
        label = apply(model, mode, args.factor, step)
        prefill_s, rate = decode_speed(model, ids, args.decode, pad_id)
        static_rate = static_rate or rate
        lines.append(f"| {label} | {prefill_s:.1f} | {rate:.2f} | {rate / static_rate:.2f}x |")
        print(lines[-1], flush=True)

    scored = args.prefill + args.ppl_tokens
    lines += [
        "",
        f"## Perplexity of incremental decoding: tokens {args.prefill}..{scored - 1}, teacher-forced one at a time",
        "",
        f"Prefill {args.prefill} tokens in one call, then one token per call through a DynamicCache. "
        f"'past {original}' scores only the tokens at positions {original} and beyond.",
        "",
        f"| RoPE | perplexity, all {args.ppl_tokens} | perplexity, past {original} | time (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    ids = torch.tensor([stream[:scored]])
    rows = [("none", None), ("dynamic-ntk:legacy", None)]
    rows += [("dynamic-ntk:consistent", int(s)) for s in args.steps.split(",")]
    past = original - args.prefill  # index of position `original` among the scored tokens
    for mode, step in rows:
        label = apply(model, mode, args.factor, step)
        start = time.perf_counter()
        nll = incremental_nll(model, ids, args.prefill)
        elapsed = time.perf_counter() - start
        lines.append(
            f"| {label} | {math.exp(nll.mean()):.3f} | {math.exp(nll[past:].mean()):.3f} | {elapsed:.0f} |"
        )
        print(lines[-1], flush=True)
    rope_ntk.unpatch(model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
