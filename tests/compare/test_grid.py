"""Grid files: parsing, the one-line errors before anything runs, equal-budget enforcement, the commands a
scheduler gets, and resume (finished steps are skipped, a checkpointed run is resumed) with a fake runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlm.cli import main
from kdlm.compare.grid import load_grid
from kdlm.compare.run import plan_steps, print_commands, run_grid
from kdlm.errors import ConfigError, DataError, KdlmError

from .conftest import write_grid

FKL = {"name": "forward_kl", "set": ["loss.terms=[{name: forward_kl}]"]}


def test_a_grid_resolves_baselines_and_variants(tmp_path, tiny_grid):
    grid = load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL, {"name": "rkl", "set": ["loss.terms=[{name: reverse_kl}]"]}]))
    assert [v.name for v in grid.variants] == ["teacher", "initial", "sft", "forward_kl", "rkl"]
    assert [v.role for v in grid.variants] == ["teacher", "initial", "sft", "method", "method"]
    assert grid.baseline == "sft" and grid.seeds == (0,)
    off = load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL], baselines=False, name="g2.yaml"))
    assert [v.name for v in off.variants] == ["forward_kl"] and off.baseline is None


@pytest.mark.parametrize("variants, extra, message", [
    ([{"name": "x", "set": ["loss.terms=[{name: forward_kl}]", "train.no_such_field=1"]}], {},
     "variant 'x'"),
    ([FKL, dict(FKL)], {}, "'forward_kl' is given twice"),
    ([{"name": "sft", "set": []}], {}, "'sft' is a baseline's name"),
    ([{"name": "x", "set": ["train.max_steps=500"]}], {}, "sets a budget field"),
    ([FKL], {"set": ["train.max_tokens=5"]}, "sets a budget field"),
    ([FKL], {"budget": {"kind": "hours", "value": 1}}, "budget.kind"),
    ([FKL], {"budget": {"kind": "steps", "value": 2.5}}, "whole numbers"),
    ([FKL], {"seeds": [1, 1]}, "has a seed twice"),
    ([FKL], {"colour": "red"}, "colour: unknown key"),
    ([{"name": "x", "sett": []}], {}, "variants[0].sett: unknown key"),
    ([{"name": "bad name", "set": []}], {}, "variants[0].name"),
])
def test_bad_grids_are_one_line_errors_naming_the_field(tmp_path, tiny_grid, variants, extra, message):
    budget = extra.pop("budget", None)
    path = write_grid(tmp_path, tiny_grid, variants=variants, budget=budget, **extra)
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_an_eval_task_missing_its_data_is_an_error_before_anything_runs(tmp_path, tiny_grid, capsys):
    (tiny_grid["data_dir"] / "sentiment.jsonl").unlink()
    path = write_grid(tmp_path, tiny_grid, variants=[FKL])
    with pytest.raises(DataError, match="sentiment.jsonl"):
        load_grid(path)
    assert main(["compare", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlm: error:")
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was created


def test_wall_clock_budgets_cannot_be_printed_for_a_scheduler(tmp_path, tiny_grid, capsys):
    path = write_grid(tmp_path, tiny_grid, variants=[FKL], budget={"kind": "seconds", "value": 60})
    load_grid(path)  # fine when kdlm compare runs the variants one after another on one machine
    assert main(["compare", str(path), "-o", str(tmp_path / "o"), "--print-commands"]) == 2
    assert "with --print-commands use steps or tokens" in capsys.readouterr().err


@pytest.mark.parametrize("budget, field", [({"kind": "steps", "value": 7}, "train.max_steps=7"),
                                           ({"kind": "tokens", "value": 900}, "train.max_tokens=900"),
                                           ({"kind": "seconds", "value": 30}, "train.max_seconds=30")])
def test_every_trained_variant_gets_the_same_budget_and_nothing_overrides_it(tmp_path, tiny_grid, budget, field):
    from kdlm.config.load import load_recipe

    grid = load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL], budget=budget))
    distills = [s for s in plan_steps(grid, tmp_path / "out") if s.stage == "distill"]
    assert [s.variant for s in distills] == ["sft", "forward_kl"]
    for step in distills:
        sets = [step.argv[i + 1] for i, a in enumerate(step.argv) if a == "--set"]
        budget_sets = [s for s in sets if s.split("=")[0] in ("train.max_steps", "train.max_tokens", "train.max_seconds")]
        assert budget_sets == [field]
        recipe = load_recipe(step.argv[1], sets)  # the recipe each variant really runs
        name, value = field.split("=")
        assert float(getattr(recipe.train, name.split(".")[1])) == float(value)


def test_print_commands_groups_setup_jobs_and_collect(tmp_path, tiny_grid, capsys):
    path = write_grid(tmp_path, tiny_grid, variants=[FKL], seeds=[0, 1])
    assert main(["compare", str(path), "-o", str(tmp_path / "out"), "--print-commands"]) == 0
    text = capsys.readouterr().out
    jobs = text.split("# 2.")[1].split("# 3.")[0].strip().splitlines()[1:]
    assert len(jobs) == 4  # (sft, forward_kl) x 2 seeds, one line each: distill && eval
    assert all(j.startswith("kdlm distill") and " && kdlm eval " in j for j in jobs)
    assert "train.seed=1" in jobs[1]
    assert text.strip().splitlines()[-1].startswith("kdlm compare ")
    assert not (tmp_path / "out").exists()


class FakeRunner:
    """Stands in for the `kdlm` subprocesses: writes the files that mark each step complete."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: list[str], log: Path) -> tuple[int, str]:
        self.calls.append(argv)
        out = Path(argv[argv.index("--output") + 1]) if "--output" in argv else None
        if argv[0] == "distill":
            run = Path(next(a for a in argv if a.startswith("output.dir=")).split("=", 1)[1])
            if any(f in str(run) for f in self.fail):
                return 2, "kdlm: error: data.train: the file is broken\n"
            (run / "model").mkdir(parents=True, exist_ok=True)
            (run / "final_metrics.json").write_text(json.dumps({"steps": 3}))
            (run / "metrics.jsonl").write_text("")
        elif argv[0] == "eval":
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text("{}")
        return 0, ""


def test_resume_skips_finished_steps_retries_failed_ones_and_resumes_checkpointed_runs(tmp_path, tiny_grid):
    grid = load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL, {"name": "broken", "set": []}]))
    out = tmp_path / "out"
    first = FakeRunner(fail=("broken",))
    run_grid(grid, out, runner=first)
    names = [(c[0], c[c.index("--output") + 1] if "--output" in c else "") for c in first.calls]
    assert len(first.calls) == 2 + 2 * 2 + 1  # teacher + initial eval, sft and forward_kl both steps, broken distill
    status = json.loads((out / "variants" / "broken" / "seed0" / "status.json").read_text())
    assert status == {"status": "failed", "stage": "distill", "error": "data.train: the file is broken"}
    assert json.loads((out / "variants" / "forward_kl" / "seed0" / "status.json").read_text())["status"] == "done"
    assert names[0][1].endswith("baselines/teacher/eval")

    # second call: only the failed variant runs again; a killed run with a checkpoint is resumed
    ckpt = out / "variants" / "sft" / "seed0" / "run"
    (ckpt / "final_metrics.json").unlink()
    (ckpt / "checkpoints" / "step_2").mkdir(parents=True)
    second = FakeRunner()
    run_grid(grid, out, runner=second)
    ran = [(c[0], next((a for a in c if a.startswith("output.dir=")), "")) for c in second.calls]
    assert [r[0] for r in ran] == ["distill", "distill", "eval"]
    assert "sft" in ran[0][1] and "--resume" in second.calls[0]
    assert "broken" in ran[1][1] and "--resume" not in second.calls[1]
    assert json.loads((out / "variants" / "broken" / "seed0" / "status.json").read_text())["status"] == "done"

    third = FakeRunner()
    run_grid(grid, out, runner=third)
    assert third.calls == []


def test_a_failed_teacher_evaluation_stops_the_comparison(tmp_path, tiny_grid):
    grid = load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL]))

    def runner(argv, log):
        return 2, "kdlm: error: the teacher could not be loaded\n"

    with pytest.raises(KdlmError, match="teacher eval failed.*could not be loaded"):
        run_grid(grid, tmp_path / "out", runner=runner)


def test_a_comparison_folder_of_another_grid_is_refused(tmp_path, tiny_grid):
    out = tmp_path / "out"
    run_grid(load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL])), out, runner=FakeRunner())
    other = load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL, {"name": "b", "set": []}], name="other.yaml"))
    with pytest.raises(KdlmError, match="different grid"):
        run_grid(other, out, runner=FakeRunner())


def test_two_calls_on_one_folder_share_the_variants(tmp_path, tiny_grid, monkeypatch, capsys):
    import socket
    import subprocess

    grid = load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL]))
    out = tmp_path / "out"
    other = subprocess.Popen(["sleep", "60"])  # stands in for a second `kdlm compare` that holds forward_kl
    try:
        status = out / "variants" / "forward_kl" / "seed0" / "status.json"
        status.parent.mkdir(parents=True)
        status.write_text(json.dumps({"status": "running", "stage": "distill", "pid": other.pid,
                                      "host": socket.gethostname()}))
        runner = FakeRunner()
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        run_grid(grid, out, runner=runner)
        assert "OMP_NUM_THREADS is not set" in capsys.readouterr().err  # two calls would oversubscribe the cores
        assert not any("forward_kl" in " ".join(c) for c in runner.calls)  # left to its holder
        assert any("variants/sft" in " ".join(c) for c in runner.calls)
    finally:
        other.kill()
        other.wait()
    runner = FakeRunner()  # the holder died: its claim is stale and the variant is taken over
    run_grid(grid, out, runner=runner)
    assert [c[0] for c in runner.calls] == ["distill", "eval"]
    done = json.loads(status.read_text())
    assert done["status"] == "done" and "pid" not in done and "distill_seconds" in done and "eval_seconds" in done


def test_a_second_call_trains_variants_while_the_first_evaluates_the_teacher(tmp_path, tiny_grid):
    """The teacher's evaluation is claimed by another live call: this one trains the variants first, then waits for
    the teacher's summary before the evaluations that need it, and never runs the teacher step itself."""
    import socket
    import subprocess

    grid = load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL]))
    out = tmp_path / "out"
    teacher = out / "baselines" / "teacher" / "eval"
    # stands in for the other call: it finishes the teacher's evaluation after a moment
    other = subprocess.Popen(["sh", "-c", f"sleep 1.5; mkdir -p '{teacher}'; echo '{{}}' > '{teacher}/summary.json'"])
    try:
        claim = out / "claims" / "teacher_eval.json"
        claim.parent.mkdir(parents=True)
        claim.write_text(json.dumps({"status": "running", "stage": "eval", "pid": other.pid,
                                     "host": socket.gethostname()}))
        runner = FakeRunner()
        run_grid(grid, out, runner=runner, poll_seconds=0.2)
    finally:
        other.kill()
        other.wait()
    outputs = [c[c.index("--output") + 1] if "--output" in c else
               next(a for a in c if a.startswith("output.dir=")) for c in runner.calls]
    assert not any(o.endswith("baselines/teacher/eval") for o in outputs)
    kinds = [c[0] for c in runner.calls]
    assert kinds == ["distill", "distill", "eval", "eval", "eval"]  # both trainings before any evaluation
    assert (teacher / "summary.json").is_file() and all((Path(o) / "summary.json").is_file() for o in outputs[2:])


def test_a_dead_callers_claim_on_the_teacher_step_is_taken_over(tmp_path, tiny_grid):
    import socket
    import subprocess

    grid = load_grid(write_grid(tmp_path, tiny_grid, variants=[FKL]))
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    claim = out / "claims" / "teacher_eval.json"
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"status": "running", "pid": dead.pid, "host": socket.gethostname()}))
    runner = FakeRunner()
    run_grid(grid, out, runner=runner, poll_seconds=0.2)
    assert runner.calls[0][runner.calls[0].index("--output") + 1].endswith("baselines/teacher/eval")
    assert not claim.exists()  # the claim of a finished step is removed
