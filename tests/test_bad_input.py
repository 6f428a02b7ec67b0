"""Bad input: each case is one clear `error: ...` line, exit status 2, and nothing written or written over.

| case                                           | outcome                                             | test |
|------------------------------------------------|-----------------------------------------------------|------|
| unknown model name                             | error, lists close matches                          | `unknown_model` |
| unknown method name                            | error, lists close matches                          | `unknown_method` |
| config key that does not exist                 | error, lists close matches                          | `unknown_key` |
| teacher checkpoint of another architecture     | error names both architectures                      | `teacher_other_arch` |
| teacher checkpoint with another class count    | error names both counts                             | `teacher_other_classes` |
| OOD folder empty                               | error names the folder                              | `ood_empty` |
| OOD folder with only unreadable files          | error (each file warned about by name)              | `ood_unreadable` |
| a corrupt image among good ones, on_corrupt=error | error names the file                             | `corrupt_image_error` |
| a corrupt image among good ones (default warn) | the run goes on; a warning names the skipped file   | `test_corrupt_image_is_skipped_with_a_warning` |
| test set with labels outside the teacher's classes | error names the label range and the class count | `labels_outside_teacher` |
| image size the generator cannot produce        | error says which sizes it can make                  | `generator_size` |
| zero or negative batch size / steps            | error names the key and the value                   | `zero_batch`, `negative_steps` |
| image size different from the teacher's        | error gives the fix (data.image_size=...)           | `teacher_image_size` |
| student that cannot take the task's images     | error names network, image shape and the fix        | `student_image_size` |
| timm option the student's network does not have | error names the key and close matches              | `student_kwarg` |
| timm option mosaic sets itself (num_classes)   | error names the key                                 | `reserved_kwarg` |
| existing run folder                            | refused unless resume=true or overwrite=true; untouched | `test_existing_run_folder_is_left_untouched` |
| non-finite losses / weights                    | DivergenceError naming player and step (guard)      | `tests/test_reliability.py` |
| teacher/student checkpoint that does not exist | error names the key and path, before any data is decoded | `tests/test_teacher_norm.py` |
| teacher.mean/std: wrong length, not a list, only one given, std <= 0 | error names the key, the count, an example | `teacher_mean_length`, `teacher_mean_scalar`, `teacher_std_missing`, `teacher_std_zero` |
| log_with: unknown tracker, or its package missing | error lists the trackers / says what to install   | `unknown_tracker`, `missing_tracker` |
| a checkpoint write fails (disk full)           | error names folder, free space, the checkpoint resume uses; no .tmp left | `tests/test_reliability.py` |
"""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, make_task, write_images
from mosaic.cli import main

MOSAIC = {"student.arch": "cnn_tiny", "mosaic.patch_size": 8, "mosaic.ngf": 8, "mosaic.ndf": 8,
          "mosaic.student_steps": 1, "steps": 1}


def _setup(case: str, tiny_task, tiny_teacher, tmp_path) -> tuple[dict, list[str]]:
    """Overrides for `case` and the words its error must contain."""
    teacher = str(tiny_teacher)
    o = {**MOSAIC, "teacher": teacher}
    if case == "unknown_model":
        return {**o, "student.arch": "resnet18_cifr"}, ["resnet18_cifr", "resnet18_cifar"]
    if case == "unknown_method":
        return {**o, "method": "mosiac"}, ["unknown method 'mosiac'", "mosaic"]
    if case == "unknown_key":
        return {**o, "mosaic.lamda_adv": 1}, ["mosaic.lamda_adv", "lambda_adv"]
    if case == "teacher_other_arch":
        return {**o, "teacher.arch": "wrn16_1"}, ["cnn_tiny", "wrn16_1"]
    if case == "teacher_other_classes":
        return {**o, "teacher.num_classes": 5}, ["3 classes", "num_classes=5"]
    if case == "ood_empty":
        (tmp_path / "empty").mkdir()
        return {**o, "data.ood": str(tmp_path / "empty")}, ["empty"]
    if case == "ood_unreadable":
        (tmp_path / "bad").mkdir()
        for i in range(3):
            (tmp_path / "bad" / f"x{i}.jpg").write_bytes(b"not an image")
        return {**o, "data.ood": str(tmp_path / "bad")}, ["no readable images"]
    if case == "corrupt_image_error":
        folder = tmp_path / "ood"
        shutil.copytree(tiny_task["ood"], folder)
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        return {**o, "data.ood": str(folder), "data.on_corrupt": "error"}, ["broken.png"]
    if case == "labels_outside_teacher":
        other = make_task(tmp_path / "four", classes=4, train=2, test=2, ood=2)
        return {**o, "data.test": str(other["task"])}, ["labels up to 3", "3 classes"]
    if case == "generator_size":
        # a bare state_dict teacher carries no image size, so nothing else objects to 18x18 images
        weights = tmp_path / "teacher.pt"
        torch.save(load_file(tiny_teacher), weights)
        return ({**o, "teacher": str(weights), "teacher.arch": "cnn_tiny", "data.image_size": 18},
                ["multiple of 4", "18"])
    if case == "teacher_image_size":
        return {**o, "data.image_size": 24}, ["image_size=16", "data.image_size=16"]
    if case == "student_image_size":  # a ViT forced to 224px inputs on a 16x16 task
        vit = {"student.arch": "vit_tiny_patch16_224", "student.kwargs.img_size": 224, "student.kwargs.depth": 1}
        return {**o, **vit}, ["student vit_tiny_patch16_224 cannot take 3x16x16 images", "student.kwargs.img_size"]
    if case == "student_kwarg":
        return ({**o, "student.arch": "vit_tiny_patch16_224", "student.kwargs.drop_path": 0.1},
                ["student.kwargs.drop_path is not an option of vit_tiny_patch16_224", "drop_path_rate"])
    if case == "reserved_kwarg":
        return {**o, "student.kwargs.num_classes": 5}, ["student.kwargs.num_classes", "remove it"]
    if case == "zero_batch":
        return {**o, "batch_size": 0}, ["'batch_size' must be a positive integer", "0"]
    if case == "negative_steps":
        return {**o, "steps": -5}, ["'steps' must be a positive integer", "-5"]
    if case == "teacher_mean_length":
        return ({**o, "teacher.mean": "[0.485,0.456]", "teacher.std": "[0.229,0.224,0.225]"},
                ["'teacher.mean' must be a list of 3 numbers", "[0.485, 0.456]", "teacher.mean=[0.485, 0.456, 0.406]"])
    if case == "teacher_mean_scalar":
        return {**o, "teacher.mean": "0.5", "teacher.std": "[0.2,0.2,0.2]"}, ["'teacher.mean' must be a list of 3"]
    if case == "teacher_std_missing":
        return {**o, "teacher.mean": "[0.485,0.456,0.406]"}, ["'teacher.mean' is set but 'teacher.std' is not"]
    if case == "teacher_std_zero":
        return {**o, "teacher.mean": "[0.5,0.5,0.5]", "teacher.std": "[0.2,0,0.2]"}, ["'teacher.std' must be positive"]
    if case == "unknown_tracker":
        return {**o, "log_with": "tensorbord"}, ["log_with='tensorbord' is not a tracker Accelerate knows",
                                                 "tensorboard", "none"]
    if case == "missing_tracker":
        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed")
        return {**o, "log_with": "wandb"}, ["log_with=wandb needs the wandb package", "pip install wandb",
                                            "log_with=none"]
    raise AssertionError(case)


CASES = ["unknown_model", "unknown_method", "unknown_key", "teacher_other_arch", "teacher_other_classes",
         "ood_empty", "ood_unreadable", "corrupt_image_error", "labels_outside_teacher", "generator_size",
         "teacher_image_size", "student_image_size", "student_kwarg", "reserved_kwarg", "zero_batch", "negative_steps",
         "teacher_mean_length", "teacher_mean_scalar", "teacher_std_missing", "teacher_std_zero", "unknown_tracker",
         "missing_tracker"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(case, tiny_task, tiny_teacher, tmp_path, capsys):
    overrides, words = _setup(case, tiny_task, tiny_teacher, tmp_path)
    out = tmp_path / "runs"
    code = main(["distill", *base_overrides(tiny_task, out, name="r", **overrides)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert not (out / "r").exists(), "a failed start must not leave a run folder behind"


def test_existing_run_folder_is_left_untouched(tiny_task, tiny_teacher, tmp_path, capsys):
    args = base_overrides(tiny_task, tmp_path, name="r", teacher=str(tiny_teacher), **MOSAIC)
    assert main(["distill", *args]) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run folder") and "resume=true" in err and "overwrite=true" in err
    after = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert after == before


def test_failed_overwrite_keeps_the_old_run(tiny_task, tiny_teacher, tmp_path, capsys):
    """overwrite=true deletes the old run only once the new one has passed every check."""
    args = base_overrides(tiny_task, tmp_path, name="r", teacher=str(tiny_teacher), **MOSAIC)
    assert main(["distill", *args]) == 0
    assert main(["distill", *args, "overwrite=true", "teacher.arch=wrn16_1"]) == 2
    assert (tmp_path / "r" / "results.json").is_file()


def test_corrupt_image_is_skipped_with_a_warning(tiny_task, tiny_teacher, tmp_path):
    folder = tmp_path / "ood"
    write_images(folder, 8, size=16, rng=__import__("numpy").random.default_rng(0))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    args = base_overrides(tiny_task, tmp_path / "runs", name="r", teacher=str(tiny_teacher),
                          **{**MOSAIC, "data.ood": str(folder)})
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert main(["distill", *args]) == 0
