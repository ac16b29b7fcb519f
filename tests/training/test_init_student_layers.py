"""A student made once by `kdlm init-student` keeps its layer map: `layers: kept` maps each of its layers to the
teacher layer it was copied from when the recipe's teacher is the model it was cut from, and to nothing else."""

from __future__ import annotations

import json

from kdlm.cli import main
from kdlm.training.trainer import init_student_layers


def test_init_student_folder_records_its_source_and_layers(tmp_path, tiny_model_dir):
    out = tmp_path / "student"
    assert main(["init-student", "--teacher", str(tiny_model_dir), "--layer-list", "0,3", "--output", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["source"] == str(tiny_model_dir) and report["kept_layers"] == [0, 3]
    assert init_student_layers(str(out), str(tiny_model_dir)) == [0, 3]
    assert init_student_layers(str(out), "some/other-teacher") is None  # cut from another model: no `kept` map
    assert init_student_layers(str(tiny_model_dir), str(tiny_model_dir)) is None  # not an init-student folder
