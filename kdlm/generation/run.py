"""`kdlm generate`: run a generation recipe into a dataset folder, losing nothing and paying nothing twice.

    prompts -> pipeline coroutines (one per prompt) -> Generator.samples() -> request cache | backend
            -> rows, appended to the row log as each prompt finishes -> filters -> JSONL shards + manifest + card

Every sample has a content address (`store.request_key`). `Generator.samples` answers a key from the
request cache when it is there and sends a request only when it is not; an answer is fsynced into the
cache before anything uses it. So a re-run, or a run restarted after `kill -9`, sends no request that
was already answered, and rows (keyed by the same addresses) are never written twice. A request that
finally fails goes to `failed.jsonl` with its status and message, never into a row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from kdlm.config import dump_yaml, from_dict, to_dict
from kdlm.config.generation import GenerateRecipe
from kdlm.errors import OutputError
from kdlm.generation.backends import Counters, FatalBackendError, RequestFailed, SampleRequest, Sampling, make_backend
from kdlm.generation.store import JsonlLog, RequestCache, atomic_write_text, read_records, request_key

ROW_LOG = "rows.log.jsonl"  # append-only rows as prompts finish; the shards are built from it at the end
FAILED = "failed.jsonl"
FILTERED = "filtered.jsonl"
# fields that may change between a run and its continuation (they decide how, not what, is generated)
OPERATIONAL = {"teacher.base_url", "teacher.api_key_env", "teacher.timeout_s", "teacher.max_retries",
               "teacher.backoff_base_s", "teacher.backoff_max_s", "teacher.requests_per_minute",
               "teacher.tokens_per_minute", "teacher.price_input_per_1m", "teacher.price_output_per_1m",
               "teacher.batch_size", "teacher.device", "teacher.stop_on_400", "generate.concurrency",
               "generate.filters", "generate.cache_dir", "output.overwrite", "output.shard_rows",
               "teacher.tensor_parallel_size", "teacher.data_parallel_size", "teacher.gpu_memory_utilization"}


class LimitReached(Exception):
    """--max-requests / --max-tokens / --max-cost is spent: no new request is sent."""


@dataclass
class Limits:
    max_requests: Optional[int] = None
    max_tokens: Optional[int] = None
    max_cost: Optional[float] = None


@dataclass
class SampleResult:
    """One sample as the pipelines see it: its key, index and the completion (text, finish_reason, usage, ...)."""

    key: str
    index: int
    completion: dict
    cached: bool

    @property
    def text(self) -> str:
        return self.completion["text"]


@dataclass
class Generator:
    """What pipelines call to get samples: cache first, backend second, failures recorded, limits enforced."""

    recipe: GenerateRecipe
    backend: Any
    cache: RequestCache
    failed_log: JsonlLog
    counters: Counters
    limits: Limits
    bar: Any = None
    stats: dict = field(default_factory=dict)  # pipeline figures for the summary (e.g. verified counts)
    failed_keys: set = field(default_factory=set)
    inflight: dict = field(default_factory=dict)
    slots: Optional[asyncio.Semaphore] = None  # generate.concurrency requests out at once  # request key -> future of its completion, while it is being fetched
    stopped: Optional[str] = None
    new_requests: int = 0

    def sampling(self, **changes: Any) -> Sampling:
        g = self.recipe.generate
        base = Sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                        stop=tuple(g.stop), logprobs=g.logprobs)
        return dataclasses.replace(base, **changes)

    def key(self, messages: list[dict], sampling: Sampling, seed: int, index: int) -> str:
        t = self.recipe.teacher
        return request_key({"backend": t.backend, "model": t.model, "fingerprint": self.backend.fingerprint,
                            "messages": messages, "sampling": sampling.as_dict(), "seed": seed, "sample_index": index})

    async def samples(self, messages: list[dict], *, n: int, first_index: int = 0, sampling: Optional[Sampling] = None,
                      ref: str = "") -> list[SampleResult]:
        """Samples first_index .. first_index + n - 1 of the teacher's answer to `messages` (failed ones left out)."""
        sampling = sampling or self.sampling()
        seed = self.recipe.generate.seed
        indices = list(range(first_index, first_index + n))
        keys = {i: self.key(messages, sampling, seed, i) for i in indices}
        got: dict[int, SampleResult] = {}
        for i in indices:
            hit = self.cache.get(keys[i])
            if hit is not None:
                got[i] = SampleResult(keys[i], i, hit, cached=True)
                self.counters.cached += 1
                self._tick()
        missing = [i for i in indices if i not in got]
        # the same sample asked for by another prompt right now (duplicate prompts, identical self_instruct
        # requests): wait for that answer instead of paying for it twice
        waiting = {i: self.inflight[keys[i]] for i in missing if keys[i] in self.inflight}
        to_send = [i for i in missing if i not in waiting]
        if to_send:
            if self.slots is None:
                self.slots = asyncio.Semaphore(self.recipe.generate.concurrency)
            await self.slots.acquire()  # limits are checked when a request really goes out, so token and cost
            try:                        # limits overshoot by at most the requests already in flight
                self._check_limits()
            except LimitReached:
                self.slots.release()
                raise
            loop = asyncio.get_running_loop()
            futures = {i: loop.create_future() for i in to_send}
            self.inflight.update({keys[i]: futures[i] for i in to_send})
            try:
                for run in _contiguous(to_send):  # one request per run, so sample i always has seed + i
                    self.new_requests += 1
                    request = SampleRequest(messages=messages, sampling=sampling, n=len(run), seed=seed + run[0])
                    try:
                        answers = await self.backend.sample(request)
                    except RequestFailed as err:
                        self._record_failure([keys[i] for i in run], messages, sampling, err, ref)
                        answers = []
                    entries = [(keys[i], a.as_dict()) for i, a in zip(run, answers)]
                    self.cache.put(entries)  # fsynced before anything uses the answers
                    for i, (k, c) in zip(run, entries):
                        got[i] = SampleResult(k, i, c, cached=False)
                        self.counters.samples += 1
                        self._tick()
                        futures[i].set_result(c)
                    for i in run[len(entries):]:
                        futures[i].set_result(None)
            finally:
                self.slots.release()
                for i in to_send:
                    self.inflight.pop(keys[i], None)
                    if not futures[i].done():
                        futures[i].cancel()
        for i, future in waiting.items():
            completion = await future
            if completion is not None:
                got[i] = SampleResult(keys[i], i, completion, cached=True)
                self.counters.cached += 1
                self._tick()
        return [got[i] for i in indices if i in got]

    def _record_failure(self, keys: list[str], messages, sampling: Sampling, err: RequestFailed, ref: str) -> None:
        self.counters.failed += len(keys)
        self.failed_keys.update(keys)
        self.failed_log.append([{"request_key": k, "source": ref, "status": err.status, "message": err.message,
                                 "attempts": err.attempts, "messages": messages, "sampling": sampling.as_dict(),
                                 "time": _now()} for k in keys])
        for _ in keys:
            self._tick()

    def _check_limits(self) -> None:
        c, lim = self.counters, self.limits
        if self.stopped is None:
            if lim.max_requests is not None and self.new_requests >= lim.max_requests:
                self.stopped = f"--max-requests {lim.max_requests} reached"
            elif lim.max_tokens is not None and c.prompt_tokens + c.completion_tokens >= lim.max_tokens:
                self.stopped = f"--max-tokens {lim.max_tokens} reached"
            elif lim.max_cost is not None and c.cost >= lim.max_cost:
                self.stopped = f"--max-cost {lim.max_cost:g} reached"
        if self.stopped:
            raise LimitReached(self.stopped)

    def _tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def grow(self, samples: int) -> None:
        """Pipelines that decide more work as they go (cot's resampling rounds) add it to the bar's total."""
        if self.bar is not None and self.bar.total is not None:
            self.bar.total += samples
            self.bar.refresh()


@dataclass
class GenerationResult:
    output_dir: Path
    rows: int
    summary: dict


def generate(recipe: GenerateRecipe, *, limits: Optional[Limits] = None, dry_run: bool = False,
             show_progress: bool = True, model=None, tokenizer=None, backend=None) -> GenerationResult:
    """Run `recipe`; returns where the dataset is and the closing summary.

    model/tokenizer: an already loaded local teacher for the transformers backend. backend: a ready Backend
    object (kdlm.generation.backends.base.Backend) used instead of the one the recipe names (API users, tests)."""
    return asyncio.run(_generate(recipe, limits or Limits(), dry_run=dry_run, show_progress=show_progress,
                                 model=model, tokenizer=tokenizer, backend=backend))


async def _generate(recipe: GenerateRecipe, limits: Limits, *, dry_run: bool, show_progress: bool, model, tokenizer,
                    backend=None):
    from kdlm.generation.dataset import write_dataset
    from kdlm.generation.pipelines import get_pipeline

    out = Path(recipe.output.dir)
    g = recipe.generate
    pipeline = get_pipeline(g.pipeline)
    items = pipeline.items(recipe)  # reads and checks the prompts before anything is written or loaded
    if not getattr(pipeline, "from_cot", False):
        _check_sampling(g)
    from kdlm.generation.dataset import check_filters

    check_filters(recipe)  # a typo in a filter fails now, not after every request was paid for
    if dry_run:
        plan = pipeline.estimate(recipe, items)
        summary = {"dry_run": True, "prompts": len(items), **plan}
        print(f"kdlm: dry run: {len(items)} prompts -> {plan['requests']} requests ({plan['samples']} samples); "
              f"about {plan['prompt_tokens']:,} prompt tokens and at most {plan['max_completion_tokens']:,} completion "
              f"tokens{' (' + plan['note'] + ')' if plan.get('note') else ''}")
        return GenerationResult(out, 0, summary)
    fresh = _check_output(out, recipe)
    cache_dir = Path(g.cache_dir).expanduser() if g.cache_dir else out / "request_cache"
    if backend is None:
        counters = Counters()
        backend = make_backend(recipe.teacher, counters, concurrency=g.concurrency, want_logprobs=g.logprobs,
                               cache_dir=cache_dir, model=model, tokenizer=tokenizer)
    counters = backend.counters
    started = time.perf_counter()
    caps = await backend.start()  # the capability probe: a 401 or an unknown model stops here, nothing written
    if g.logprobs and not caps.logprobs:
        await backend.close()
        raise FatalBackendError(f"generate.logprobs: {g.logprobs} asked, but the {recipe.teacher.backend} backend "
                                "returns no log-probs")
    if g.logprobs > caps.max_top_logprobs:
        await backend.close()
        raise FatalBackendError(f"generate.logprobs: {g.logprobs} asked, the server returns at most "
                                f"{caps.max_top_logprobs} top log-probs")
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in (ROW_LOG, FAILED, FILTERED):
            (out / name).unlink(missing_ok=True)
    atomic_write_text(out / "resolved_config.yaml", dump_yaml(recipe))
    cache = RequestCache(cache_dir)
    old_failed = {r.get("request_key") for r in read_records(out / FAILED)}
    failed_log = JsonlLog(out / FAILED)
    row_log = JsonlLog(out / ROW_LOG)
    written = {r["id"] for r in row_log.records()}
    produced: set[str] = set()
    planned = pipeline.estimate(recipe, items)["samples"]
    bar = tqdm(total=planned, desc=f"generate {g.pipeline}", unit="sample", disable=not show_progress,
               dynamic_ncols=True)
    gen = Generator(recipe, backend, cache, failed_log, counters, limits, bar=bar)
    for note in caps.notes:
        print(f"kdlm: teacher: {note}", flush=True)

    async def run_item(item) -> None:
        try:
            rows = await pipeline.run(gen, item)
        except LimitReached:
            return
        produced_now = sum(r["id"] in produced for r in rows)  # the same sample from another prompt this run
        if produced_now:
            gen.stats["duplicate_rows"] = gen.stats.get("duplicate_rows", 0) + produced_now
        produced.update(r["id"] for r in rows)
        new = [r for r in rows if r["id"] not in written]
        row_log.append(new)  # one fsync per prompt
        written.update(r["id"] for r in new)
        _postfix(bar, counters, started)

    try:
        try:
            work = await pipeline.prepare(gen, items)  # e.g. self_instruct's instruction rounds
        except LimitReached:
            work = []
        # bounded fan-out: max(4 x concurrency, 64) prompts in flight (memory stays flat for huge prompt files)
        gate = asyncio.Semaphore(max(4 * g.concurrency, 64))

        async def gated(item):
            async with gate:
                await run_item(item)

        tasks = [asyncio.create_task(gated(item)) for item in work]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        await pipeline.after(gen, items)
    finally:
        bar.close()
        await backend.close()
        cache.close()
        failed_log.close()
        row_log.close()

    # failures of earlier runs that have since been answered are no longer failures
    still_failed = [r for r in read_records(out / FAILED) if r["request_key"] not in cache]
    _rewrite_jsonl(out / FAILED, _unique(still_failed, "request_key"))
    rows = read_records(out / ROW_LOG)
    wall = time.perf_counter() - started
    summary = _summary(recipe, counters, gen, rows, wall, len(items), caps, resolved_failures=len(old_failed - gen.failed_keys))
    n_rows = write_dataset(out, recipe, rows, summary, pipeline=pipeline, complete=gen.stopped is None)
    summary["rows"] = n_rows
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    _print_summary(summary, out)
    return GenerationResult(out, n_rows, summary)


def _check_sampling(g) -> None:
    if g.temperature == 0 and (g.n > 1 or (g.pipeline in ("cot", "step_by_step") and g.max_rounds > 1)):
        from kdlm.errors import ConfigError

        what = "generate.n" if g.n > 1 else "generate.max_rounds"
        raise ConfigError(f"{what}: several samples of a prompt need generate.temperature > 0 (greedy samples are "
                          "identical, and vLLM refuses n > 1 with greedy sampling)")


def _check_output(out: Path, recipe: GenerateRecipe) -> bool:
    """True for a fresh start (empty folder, or overwrite of another generation), False to continue a run."""
    resolved = out / "resolved_config.yaml"
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if not resolved.is_file():
        if out.is_dir() and any(p for p in out.iterdir() if p.name != "request_cache"):
            raise OutputError(f"{out}: the output folder holds other files; choose another output.dir")
        return True
    import yaml

    try:
        old = _flat(to_dict(from_dict(GenerateRecipe, yaml.safe_load(resolved.read_text()))))
    except Exception:
        old = {}
    new = _flat(to_dict(recipe))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in OPERATIONAL)
    if not changed:
        return False  # the same generation: continue it (cached answers are reused, rows not rewritten)
    if not recipe.output.overwrite:
        raise OutputError(f"{out}: holds another generation (it differs in {', '.join(changed[:4])}); choose another "
                          "output.dir or --set output.overwrite=true (its request cache is kept)")
    for p in out.iterdir():
        if p.name == "request_cache":
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return True


def _summary(recipe, c: Counters, gen: Generator, rows: list[dict], wall: float, prompts: int, caps,
             resolved_failures: int) -> dict:
    return {
        "pipeline": recipe.generate.pipeline,
        "teacher": {"backend": recipe.teacher.backend, "model": recipe.teacher.model,
                    "fingerprint": gen.backend.fingerprint, "capabilities": caps.as_dict()},
        "prompts": prompts,
        "rows_before_filters": len(rows),
        "samples_new": c.samples,
        "samples_cached": c.cached,
        "samples_failed": c.failed,
        "earlier_failures_now_answered": resolved_failures,
        "requests": gen.new_requests,
        "http_requests": c.http_requests,
        "retried": c.retried,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "wall_s": round(wall, 2),
        "requests_per_s": round(gen.new_requests / wall, 3) if wall else None,
        "completion_tokens_per_s": round(c.completion_tokens / wall, 2) if wall else None,
        "cost": round(c.cost, 6) if (recipe.teacher.price_input_per_1m or recipe.teacher.price_output_per_1m) else None,
        "stopped": gen.stopped,
        **gen.stats,
    }


def _print_summary(s: dict, out: Path) -> None:
    parts = [f"{s['rows']} rows", f"{s['requests']} requests ({s['http_requests']} HTTP attempts)" if s["http_requests"]
             else f"{s['requests']} requests", f"{s['samples_cached']} cached", f"{s['samples_failed']} failed",
             f"{s['retried']} retried", f"{s['completion_tokens']:,} completion tokens",
             f"{s['completion_tokens_per_s'] or 0:.1f} tok/s", f"{s['wall_s']:.1f} s"]
    if s.get("cost") is not None:
        parts.append(f"cost {s['cost']:.4f}")
    if "verified_fraction" in s:
        parts.append(f"verified {s['verified_fraction']:.1%} of samples")
    print(f"kdlm: generate {s['pipeline']}: " + ", ".join(parts) + f" -> {out}", flush=True)
    if s["samples_failed"]:
        print(f"kdlm: {s['samples_failed']} samples failed; see {out / FAILED} (a re-run retries them)", flush=True)
    if s["stopped"]:
        print(f"kdlm: stopped early: {s['stopped']}; re-run the same command to continue", flush=True)


def _postfix(bar, c: Counters, started: float) -> None:
    wall = max(time.perf_counter() - started, 1e-9)
    bar.set_postfix({"req/s": f"{c.answered_requests / wall:.2f}", "tok/s": f"{c.completion_tokens / wall:.0f}",
                     "cached": c.cached, "failed": c.failed, "retried": c.retried}, refresh=False)


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    if records:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        path.unlink(missing_ok=True)


def _unique(records: list[dict], key: str) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in records:
        seen[r[key]] = r  # the latest attempt's status wins
    return list(seen.values())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).endswith(("extra_body", "verifier_options")):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str)
    return out


def _contiguous(indices: list[int]) -> list[list[int]]:
    """[0, 1, 3, 4, 5] -> [[0, 1], [3, 4, 5]]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
