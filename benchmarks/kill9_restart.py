"""`kdlm generate` killed with SIGKILL halfway, then restarted, against a real vLLM server: the requests are
counted at the server (`/metrics`, vllm:request_success_total), the rows in the output.

    scripts/vllm_cpu_server.sh start <bundled teacher HF folder>
    .venv/bin/python benchmarks/kill9_restart.py [--base-url http://127.0.0.1:8765/v1] [--prompts 48]

Writes benchmarks/results/kill9_restart.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, utc_now, versions  # noqa: E402


def answered(base_url: str) -> int:
    """Requests the server finished with a full answer (finished_reason stop or length)."""
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return int(sum(float(m.group(2)) for m in re.finditer(
        r'^vllm:request_success_total\{[^}]*finished_reason="(stop|length)"[^}]*\} ([0-9.e+]+)$', text, re.M)))


def complete_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}")) if path.is_file() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8765/v1")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    lines = (REPO / "kdlm" / "quickstart" / "prompts.jsonl").read_text().splitlines()[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "p.jsonl").write_text("\n".join(lines) + "\n")
        recipe = tmp / "r.yaml"
        recipe.write_text(json.dumps({
            "teacher": {"backend": "openai", "model": "teacher", "base_url": args.base_url, "send_seed": False},
            "generate": {"prompts": str(tmp / "p.jsonl"), "max_new_tokens": 64, "concurrency": args.concurrency},
            "output": {"dir": str(tmp / "out")}}))
        cmd = [sys.executable, "-m", "kdlm", "generate", str(recipe), "--no-progress"]
        log = tmp / "out" / "request_cache" / "responses.jsonl"
        start = answered(args.base_url)
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while complete_lines(log) < args.prompts // 2 and child.poll() is None:
            time.sleep(0.05)
        child.kill()
        child.wait()
        time.sleep(3)  # what was in flight finishes (or is aborted) at the server
        stored = complete_lines(log)
        at_kill = answered(args.base_url) - start
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        restart_s = time.perf_counter() - started
        total = answered(args.base_url) - start
        manifest = json.loads((tmp / "out" / "manifest.json").read_text())
        rows = [json.loads(x) for s in manifest["shards"] for x in (tmp / "out" / s).read_text().splitlines()]
        summary = json.loads((tmp / "out" / "summary.json").read_text())
    lost = at_kill - 1 - stored  # answered by the server, never stored by the killed client (in flight)
    results = {
        "machine": machine_info(), "versions": versions("httpx"), "date": utc_now(), "server": args.base_url,
        "prompts": args.prompts, "concurrency": args.concurrency, "restart_rc": done.returncode,
        "answers_stored_before_kill": stored, "server_answers_before_kill": at_kill,
        "answers_lost_in_flight": lost, "restart_requests": summary["requests"],
        "restart_cached": summary["samples_cached"], "server_answers_total": total,
        "expected_total": args.prompts + 1 + lost, "rows": len(rows), "distinct_row_ids": len({r["id"] for r in rows}),
        "distinct_prompts": len({r["provenance"]["source"] for r in rows}), "restart_wall_s": round(restart_s, 1),
    }
    results["ok"] = (done.returncode == 0 and total == results["expected_total"] and len(rows) == args.prompts
                     == results["distinct_row_ids"] == results["distinct_prompts"])
    out = REPO / "benchmarks" / "results"
    (out / "kill9_restart.json").write_text(json.dumps(results, indent=1) + "\n")
    md = [f"# kill -9 halfway, then restart ({results['date']}, {results['machine']['cpu']})", "",
          f"- {args.prompts} prompts, concurrency {args.concurrency}, vLLM server {args.base_url}",
          f"- killed with {stored} answers stored; the server had answered {at_kill} requests (the probe included), "
          f"so {lost} answers were in flight and lost",
          f"- the restart sent {summary['requests']} requests and read {summary['samples_cached']} from the cache",
          f"- the server answered {total} requests in all = {args.prompts} prompts + 1 probe + {lost} lost: "
          f"**{'no' if total == results['expected_total'] else 'SOME'} stored answer asked for again**",
          f"- output: {len(rows)} rows, {results['distinct_row_ids']} distinct ids, {results['distinct_prompts']} "
          "distinct prompts", ""]
    (out / "kill9_restart.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
