"""Run a grid: setup once, then every variant as a plain `kdlm distill` and `kdlm eval` (separate processes, so a
failed or out-of-memory variant cannot take the others down), then collect compare.json and the report.

    OUT/grid.yaml                         a copy of the grid file, for provenance
    OUT/setup/data/                       `kdlm generate`'s dataset folder (setup.generate)
    OUT/setup/student/                    `kdlm init-student`'s student (setup.student)
    OUT/baselines/teacher/eval/           the teacher's evaluation (reused by every other evaluation)
    OUT/baselines/initial/eval/           the initial student's
    OUT/variants/<name>/seed<k>/run/      a `kdlm distill` run folder
    OUT/variants/<name>/seed<k>/eval/     its `kdlm eval` folder
    OUT/variants/<name>/seed<k>/status.json   done | failed (+ error) | running
    OUT/claims/<step>.json                the pid of the call running a setup or baseline step
    OUT/compare.json, OUT/report/         the comparison and its report

Resumable: a step whose output is complete is skipped; a distillation with a checkpoint but no final model is
continued with `--resume`; a failed variant is retried on the next call. `--print-commands` prints the same
commands for a scheduler instead of running them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from kdlm.compare.grid import Grid, Variant, variant_fixed_overrides
from kdlm.errors import KdlmError, OutputError


@dataclass
class Step:
    """One command of the comparison, `kdlm <argv...>`, complete when `done()` holds."""

    name: str  # e.g. "forward_kl/seed0 distill"
    argv: list[str]
    done: Callable[[], bool]
    variant: Optional[str] = None
    seed: Optional[int] = None
    stage: str = ""  # setup | distill | eval
    status_file: Optional[Path] = None  # a trained variant's status.json; None: a setup or baseline step
    needs: tuple[str, ...] = ()  # names of the steps that must be done first
    claim_file: Optional[Path] = None  # where a running `kdlm compare` claims a step without a status file

    def shell(self) -> str:
        return "kdlm " + " ".join(shlex.quote(a) for a in self.argv)


def seed_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "variants" / variant / f"seed{seed}"


def run_finished(run_dir: Path) -> bool:
    return (run_dir / "final_metrics.json").is_file() and (run_dir / "model").is_dir()


def eval_finished(eval_dir: Path) -> bool:
    return (eval_dir / "summary.json").is_file()


def has_checkpoint(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and any(ckpt.iterdir())


def teacher_eval_dir(out: Path) -> Path:
    return out / "baselines" / "teacher" / "eval"


def eval_argv(grid: Grid, models: list[str], output: Path, *, reference_from: Optional[Path]) -> list[str]:
    e = grid.eval
    argv = ["eval", *models, "--output", str(output), "--batch-size", str(e.batch_size), "--dtype", e.dtype,
            "--no-progress", "--overwrite"]
    for t in e.tasks:
        argv += ["--task", t]
    if e.limit:
        argv += ["--limit", str(e.limit)]
    if e.max_new_tokens:
        argv += ["--max-new-tokens", str(e.max_new_tokens)]
    if e.data_dir:
        argv += ["--data-dir", e.data_dir]
    if e.robustness:
        argv.append("--robustness")
    if e.efficiency:
        argv.append("--efficiency")
    if reference_from is not None:
        argv += ["--reference-from", str(reference_from)]
    if e.judge and len(models) > 1:
        argv += ["--judge-url", e.judge["url"]]
        if e.judge.get("model"):
            argv += ["--judge-model", e.judge["model"]]
        if e.judge.get("api_key_env"):
            argv += ["--judge-api-key-env", e.judge["api_key_env"]]
    return argv


def plan_steps(grid: Grid, out: Path) -> list[Step]:
    """Every command of the comparison, in an order that runs correctly one after another. The setup and
    teacher steps come first; each variant's steps depend only on them."""
    out = Path(out)
    steps: list[Step] = []
    fixed: list[str] = []
    claims = out / "claims"
    if grid.setup.generate:
        data = out / "setup" / "data"
        steps.append(Step("setup generate", ["generate", grid.setup.generate, *_sets(grid.setup.generate_set),
                                             "--set", f"output.dir={data}", "--set", "output.overwrite=true"],
                          lambda d=data: _manifest_complete(d), stage="setup",
                          claim_file=claims / "setup_generate.json"))
        fixed += [f"data.train={data}"]
    if grid.setup.student:
        student = out / "setup" / "student"
        steps.append(Step("setup student", ["init-student", *grid.setup.student, "--output", str(student), "--no-progress"],
                          lambda s=student: (s / "prune_report.json").is_file(), stage="setup",
                          claim_file=claims / "setup_student.json"))
        fixed += [o.replace("__setup_student__", str(student)) for o in variant_fixed_overrides(grid.setup)
                  if not o.startswith("data.train=")]
    setup = tuple(s.name for s in steps)
    teacher_dir = teacher_eval_dir(out)
    reference = grid.teacher
    steps.append(Step("teacher eval", eval_argv(grid, [reference], teacher_dir, reference_from=None),
                      lambda d=teacher_dir: eval_finished(d), variant="teacher", stage="eval",
                      claim_file=claims / "teacher_eval.json"))
    if grid.baselines.get("initial"):
        initial = str(out / "setup" / "student") if grid.setup.student else _base_student(grid)
        d = out / "baselines" / "initial" / "eval"
        steps.append(Step("initial eval", eval_argv(grid, [reference, initial], d, reference_from=teacher_dir),
                          lambda d=d: eval_finished(d), variant="initial", stage="eval",
                          needs=(*setup, "teacher eval"), claim_file=claims / "initial_eval.json"))
    for v in grid.trained:
        for seed in grid.seeds:
            sd = seed_dir(out, v.name, seed)
            run_dir, ev = sd / "run", sd / "eval"
            sets = [*grid.common, *fixed, *v.overrides, grid.budget.override(), f"train.seed={seed}",
                    f"output.dir={run_dir}", "output.overwrite=true", "train.save_every=" + str(_save_every(grid))]
            argv = ["distill", str(grid.recipe), *_sets(sets), "--no-progress"]
            if has_checkpoint(run_dir) and not run_finished(run_dir):
                argv.append("--resume")
            steps.append(Step(f"{v.name}/seed{seed} distill", argv, lambda r=run_dir: run_finished(r), v.name, seed,
                              "distill", sd / "status.json", needs=setup))
            steps.append(Step(f"{v.name}/seed{seed} eval", eval_argv(grid, [reference, str(run_dir)], ev,
                                                                     reference_from=teacher_dir),
                              lambda e=ev: eval_finished(e), v.name, seed, "eval", sd / "status.json",
                              needs=(f"{v.name}/seed{seed} distill", "teacher eval")))
    return steps


def _save_every(grid: Grid) -> int:
    """Checkpoint about 4 times per run at a steps budget (a killed variant resumes), else every 25 steps."""
    return max(1, int(grid.budget.value) // 4) if grid.budget.kind == "steps" else 25


def _sets(items) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def _manifest_complete(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _base_student(grid: Grid) -> str:
    from kdlm.config.load import load_recipe

    return load_recipe(grid.recipe, list(grid.common)).student.model


def print_commands(grid: Grid, out: Path) -> str:
    """The plain commands, grouped so that a scheduler can run the variants in parallel (one array task each)."""
    steps = plan_steps(grid, out)
    lines = [f"# kdlm compare {grid.file} -o {out}: {len(grid.trained)} trained variants x {len(grid.seeds)} seed(s), "
             f"budget {grid.budget.describe()}",
             "# 1. setup and baselines, once, in this order:"]
    lines += [s.shell() for s in steps if s.variant in (None, "teacher", "initial")]
    lines.append("# 2. one job per line (independent of each other; each needs step 1):")
    by_job: dict[tuple, list[Step]] = {}
    for s in steps:
        if s.variant not in (None, "teacher", "initial"):
            by_job.setdefault((s.variant, s.seed), []).append(s)
    lines += [" && ".join(s.shell() for s in job) for job in by_job.values()]
    lines.append("# 3. then collect the table and the report (skips everything already done):")
    lines.append(f"kdlm compare {shlex.quote(str(grid.file))} -o {shlex.quote(str(out))}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


@dataclass
class Outcome:
    seconds: float = 0.0


def _say(text: str) -> None:
    print(f"kdlm compare: {text}", file=sys.stderr, flush=True)


def _read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_status(path: Path, status: dict) -> None:
    """Write a variant's status, keeping the step timings already recorded (distill_seconds, eval_seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in _read_status(path).items() if k.endswith("_seconds")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**kept, **status}, indent=2) + "\n")
    os.replace(tmp, path)


def _claim() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def claimed_elsewhere(path: Path) -> Optional[int]:
    """The pid of another live `kdlm compare` on this machine that holds this variant (it is between or inside
    its steps), so that two calls on one folder share the variants instead of running one twice; else None."""
    status = _read_status(path)
    pid = status.get("pid")
    if status.get("status") not in ("running", "trained") or not isinstance(pid, int) or pid == os.getpid():
        return None
    if status.get("host") != socket.gethostname():
        return None  # another machine's claim cannot be checked: a scheduler owns that case
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a claim left by a process that died: take the variant over
    except PermissionError:
        pass
    return pid


def _error_line(stderr: str, code: int) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("kdlm: error:"):
            return ln[len("kdlm: error:"):].strip()
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[-300:]
    return f"exit status {code}" + (f": {lines[-1][-300:]}" if lines else "")


def run_command(argv: list[str], log: Path) -> tuple[int, str]:
    """`python -m kdlm ARGV`, its output appended to `log`; (exit status, stderr tail)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n$ kdlm {' '.join(shlex.quote(a) for a in argv)}\n")
        fh.flush()
        start = fh.tell()
        # both streams go to the log as they come (progress can be followed with tail -f)
        proc = subprocess.run([sys.executable, "-m", "kdlm", *argv], stdout=fh, stderr=subprocess.STDOUT, env=env)
    with log.open("rb") as fh:
        fh.seek(max(start, log.stat().st_size - 20000))
        tail = fh.read().decode("utf-8", errors="replace")
    return proc.returncode, tail


def run_grid(grid: Grid, out: Path, *, runner: Callable[[list[str], Path], tuple[int, str]] = run_command,
             poll_seconds: float = 15.0) -> Outcome:
    """Run every step not yet done, in plan order. A failed setup or teacher step stops the comparison (a
    KdlmError); a failed variant is recorded in its status.json and the others go on.

    Several calls on one folder share the work: each claims a step before running it, skips steps another live
    call holds, and waits (polling every `poll_seconds`) only when nothing else is left that it can run and a step
    it still has to run needs one that another call is running (a variant's evaluation needs the teacher's)."""
    out = Path(out)
    _prepare_output(grid, out)
    outcome = Outcome()
    start = time.perf_counter()
    steps = plan_steps(grid, out)
    index = {s.name: i for i, s in enumerate(steps, 1)}
    by_name = {s.name: s for s in steps}
    failed: set[str] = set()  # steps that failed in this call, and those that need one of them
    said: set[tuple[str, str]] = set()

    def say_once(step: Step, what: str, text: str) -> None:
        if (step.name, what) not in said:
            said.add((step.name, what))
            _say(f"[{index[step.name]}/{len(steps)}] {step.name}: {text}")

    while True:
        runnable, waiting_on = None, None
        for step in steps:
            if step.name in failed:
                continue
            if step.done():
                if (step.name, "done") not in said and step.status_file and step.stage == "eval":
                    _write_status(step.status_file, {"status": "done", "error": None})
                say_once(step, "done", "done by another kdlm compare" if (step.name, "claimed") in said
                         else "done already, skipped")
                continue
            if any(n in failed for n in step.needs):
                failed.add(step.name)
                continue
            claim = step.status_file or step.claim_file
            other = claimed_elsewhere(claim) if claim else None
            if other is not None:
                say_once(step, "claimed", f"being run by another kdlm compare (pid {other}), skipped")
                _warn_threads_once(said)
                continue
            unmet = [n for n in step.needs if not by_name[n].done()]
            if unmet:
                waiting_on = waiting_on or (step, unmet[0])
                continue
            runnable = step
            break
        if runnable is None:
            if waiting_on is None:
                break
            step, need = waiting_on
            holder = claimed_elsewhere(by_name[need].status_file or by_name[need].claim_file)
            if holder is None:
                continue  # its holder stopped or just finished: the next pass runs it or goes on
            say_once(step, "waiting", f"waiting for {need} (run by pid {holder})")
            time.sleep(poll_seconds)
            continue
        if not _run_step(runnable, index[runnable.name], len(steps), out, runner):
            failed.add(runnable.name)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _warn_threads_once(said: set) -> None:
    """Two calls sharing one machine each start PyTorch with a thread per core unless told otherwise: oversubscribed
    cores run both slower (and skew the efficiency figures), so say how to split them."""
    if "OMP_NUM_THREADS" not in os.environ and ("", "threads") not in said:
        said.add(("", "threads"))
        _say(f"another kdlm compare shares this folder, and OMP_NUM_THREADS is not set: each call's steps use all "
             f"{os.cpu_count()} cores; set OMP_NUM_THREADS to each call's share of them")


def _run_step(step: Step, i: int, n: int, out: Path, runner) -> bool:
    """Claim, run and record one step; False when it failed. A failure of a step without a status file (setup,
    baselines) raises instead: no variant can be compared without it."""
    _say(f"[{i}/{n}] {step.name}: {step.shell()}")
    claim = step.status_file or step.claim_file
    if claim:
        _write_status(claim, {"status": "running", "stage": step.stage, "error": None, **_claim()})
    t0 = time.perf_counter()
    try:
        code, stderr = runner(step.argv, out / "logs" / f"{step.name.replace('/', '_').replace(' ', '_')}.log")
    finally:
        if step.claim_file and step.claim_file.is_file():
            step.claim_file.unlink()
    seconds = time.perf_counter() - t0
    if code != 0 or not step.done():
        error = _error_line(stderr, code) if code != 0 else "finished without its output"
        _say(f"[{i}/{n}] {step.name}: FAILED after {seconds:.0f} s: {error}")
        if step.status_file is None:
            raise KdlmError(f"{step.name} failed, so no variant can be compared: {error} (log: {out / 'logs'})")
        _write_status(step.status_file, {"status": "failed", "stage": step.stage, "error": error})
        return False
    _say(f"[{i}/{n}] {step.name}: done in {seconds:.0f} s")
    if step.status_file:
        _write_status(step.status_file, {"status": "done" if step.stage == "eval" else "trained", "error": None,
                                         f"{step.stage}_seconds": round(seconds, 1),
                                         **(_claim() if step.stage != "eval" else {})})
    return True


def _prepare_output(grid: Grid, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    copy = out / "grid.yaml"
    if copy.is_file():
        old = copy.read_text(encoding="utf-8")
        if old != grid.file.read_text(encoding="utf-8"):
            raise OutputError(f"{out}: holds a comparison of a different grid (its grid.yaml differs from "
                              f"{grid.file}); choose another -o, or delete {copy} to continue with the edited grid "
                              f"(finished steps are kept as they are: remove the folders of those the edit changes)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid.file, copy)


def created_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
