"""Teacher-text throughput: kdlm's openai client at concurrency 16 vs a plain sequential client, one server.

The sequential client sends one chat request at a time and waits for each answer, as EasyDistill v1's API
path does. kdlm sends the same requests through `kdlm generate` (responses pipeline, a fresh request cache)
with 16 in flight. Both ask the same vLLM OpenAI-compatible server for the same prompts, greedy, so they
generate the same text; tokens/s counts the server-reported completion tokens over wall time. The local
`transformers` backend is timed on the same prompts too (batched by length, bf16 where the CPU has it).

    scripts/vllm_cpu_server.sh start <teacher HF folder>      # or any server: --base-url
    .venv/bin/python benchmarks/generate_throughput.py [--base-url http://127.0.0.1:8765/v1] [--prompts 32]

Writes benchmarks/results/generate_throughput.json (key `speedup_vs_sequential`) and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, utc_now, versions  # noqa: E402


COT = "Solve the problem step by step. End with a line '#### <answer>'."


def prompts(n: int, workload: str) -> list[str]:
    """chat: the quickstart's instructions (short answers). cot: the project's arithmetic word problems with the
    cot pipeline's instruction (rationales of a few hundred tokens, as chain-of-thought generation writes)."""
    name = "prompts.jsonl" if workload == "chat" else "arithmetic.jsonl"
    rows = [json.loads(line) for line in (REPO / "kdlm" / "quickstart" / name).read_text().splitlines()]
    return [r["prompt"] if workload == "chat" else f"{r['question']}\n{COT}" for r in rows[:n]]


def sequential(base_url: str, model: str, texts: list[str], max_tokens: int) -> dict:
    """One request at a time with a plain HTTP client: the baseline."""
    import httpx

    tokens = 0
    start = time.perf_counter()
    with httpx.Client(timeout=600) as client:
        for text in texts:
            resp = client.post(f"{base_url}/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0.0})
            resp.raise_for_status()
            tokens += resp.json()["usage"]["completion_tokens"]
    wall = time.perf_counter() - start
    return {"requests": len(texts), "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2)}


def plain_concurrent(base_url: str, model: str, texts: list[str], max_tokens: int, concurrency: int) -> dict:
    """A bare asyncio + httpx client with `concurrency` requests in flight and nothing else (no cache, no
    retries, no bookkeeping): the ceiling a client can reach on this server, to show what kdlm's costs."""
    import asyncio

    import httpx

    async def run() -> int:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(text: str) -> int:
                async with gate:
                    resp = await client.post(f"{base_url}/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                        "temperature": 0.0})
                    resp.raise_for_status()
                    return resp.json()["usage"]["completion_tokens"]
            return sum(await asyncio.gather(*(one(t) for t in texts)))

    start = time.perf_counter()
    tokens = asyncio.run(run())
    wall = time.perf_counter() - start
    return {"requests": len(texts), "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2)}


def kdlm_run(backend: dict, texts: list[str], max_tokens: int, concurrency: int, batch_size: int = 32) -> dict:
    from kdlm.config import from_dict
    from kdlm.config.generation import GenerateRecipe
    from kdlm.generation.run import generate

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        recipe = from_dict(GenerateRecipe, {
            "teacher": {**backend, "batch_size": batch_size},
            "generate": {"pipeline": "responses", "prompts": str(path), "max_new_tokens": max_tokens,
                         "temperature": 0.0, "concurrency": concurrency},
            "output": {"dir": str(Path(tmp) / "out")}})
        start = time.perf_counter()
        result = generate(recipe, show_progress=False)
        wall = time.perf_counter() - start  # includes the capability probe / model load, as a user sees it
    s = result.summary
    return {"requests": s["requests"], "completion_tokens": s["completion_tokens"], "wall_s": round(wall, 2),
            "tokens_per_s": round(s["completion_tokens"] / wall, 2), "generation_wall_s": s["wall_s"],
            "http_requests": s["http_requests"], "retried": s["retried"], "failed": s["samples_failed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8765/v1")
    ap.add_argument("--model", default="teacher", help="the served model name")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workload", choices=["cot", "chat"], default="cot")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each concurrent client, alternating")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    texts = prompts(args.prompts, args.workload)
    api = {"backend": "openai", "model": args.model, "base_url": args.base_url, "send_seed": False, "timeout_s": 600}
    results = {"machine": machine_info(), "versions": versions("torch", "transformers", "httpx"), "date": utc_now(),
               "server": args.base_url, "workload": args.workload, "prompts": len(texts), "max_tokens": args.max_tokens,
               "temperature": 0.0}
    # warm the server so that no client pays for what the first one would: every prompt once with one new token
    # (vLLM's prefix cache then holds every prompt for every client alike) and a concurrent burst (the CPU
    # kernels meet the batch shapes once)
    sequential(args.base_url, args.model, texts[:1], 8)
    plain_concurrent(args.base_url, args.model, texts, 1, args.concurrency)
    plain_concurrent(args.base_url, args.model, texts[: args.concurrency], 16, args.concurrency)
    # the two concurrent clients alternate, `--repeats` times each (the server's speed drifts between runs);
    # each row reports the mean of its runs, the single runs are kept under "runs"
    kdlm_key, plain_key = "kdlm_concurrency_%d" % args.concurrency, "plain_async_%d" % args.concurrency
    runs: dict[str, list[dict]] = {kdlm_key: [], plain_key: []}
    for _ in range(args.repeats):
        runs[kdlm_key].append(kdlm_run(api, texts, args.max_tokens, args.concurrency))
        print(json.dumps(runs[kdlm_key][-1]), flush=True)
        runs[plain_key].append(plain_concurrent(args.base_url, args.model, texts, args.max_tokens, args.concurrency))
        print(json.dumps(runs[plain_key][-1]), flush=True)
    for key, rs in runs.items():
        results[key] = {"requests": rs[0]["requests"],
                        "completion_tokens": round(sum(r["completion_tokens"] for r in rs) / len(rs)),
                        "wall_s": round(sum(r["wall_s"] for r in rs) / len(rs), 2),
                        "tokens_per_s": round(sum(r["tokens_per_s"] for r in rs) / len(rs), 2), "runs": rs}
    results["sequential"] = sequential(args.base_url, args.model, texts, args.max_tokens)
    print(json.dumps(results["sequential"]), flush=True)
    results["speedup_vs_sequential"] = round(results[kdlm_key]["tokens_per_s"] / results["sequential"]["tokens_per_s"], 2)
    results["bare_client_speedup_vs_sequential"] = round(results[plain_key]["tokens_per_s"]
                                                         / results["sequential"]["tokens_per_s"], 2)
    if not args.skip_transformers:
        from kdlm.models import bundled

        folder = str(bundled.materialize("smollm2-135m-instruct"))
        results["kdlm_transformers_local"] = kdlm_run({"backend": "transformers", "model": folder}, texts,
                                                      args.max_tokens, concurrency=len(texts))
        print(json.dumps(results["kdlm_transformers_local"]), flush=True)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate_throughput.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# Teacher-text throughput ({results['date']}, {results['machine']['cpu']}, "
             f"{results['machine']['cores']} cores)", "",
             f"{len(texts)} prompts ({args.workload}), greedy, max {args.max_tokens} new tokens, server {args.base_url}.", "",
             "| client | requests | completion tokens | wall (s) | tokens/s |", "|---|---:|---:|---:|---:|"]
    for key in [k for k in results if k.startswith(("kdlm", "sequential", "plain"))]:
        r = results[key]
        lines.append(f"| {key} | {r['requests']} | {r['completion_tokens']} | {r['wall_s']} | {r['tokens_per_s']} |")
    lines += ["", f"kdlm at concurrency {args.concurrency} vs sequential: **{results['speedup_vs_sequential']}x** tokens/s "
              f"(the bare async client: {results['bare_client_speedup_vs_sequential']}x). Concurrent rows are the mean of "
              f"{args.repeats} alternating runs: " + "; ".join(f"{k} " + ", ".join(str(r['tokens_per_s']) for r in rs)
                                                                for k, rs in runs.items()) + " tokens/s.", ""]
    (out / "generate_throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
