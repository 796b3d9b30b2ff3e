"""`medfm finetune` as a user runs it: a phantom dataset on disk, a tiny SAM, the figures printed side by side."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("segment_anything")
pytest.importorskip("monai")

from conftest import run_medfm  # noqa: E402
from MedFMLib.testing import write_phantom_dataset, write_tiny_sam_catalog  # noqa: E402


@pytest.fixture()
def environment(tmp_path):
    catalog = write_tiny_sam_catalog(tmp_path / "catalog", decoder_scale=1.0)
    env = {"MEDFM_CATALOG": str(catalog), "MEDFM_HOME": str(tmp_path / "home")}
    imported = run_medfm("models", "import", tmp_path / "catalog" / "sam_tiny.pth", "--name", "sam_tiny", env=env)
    assert imported.returncode == 0, imported.stderr
    return env, write_phantom_dataset(tmp_path / "data", 5)


def test_finetune_prints_base_and_new_side_by_side_and_lists_the_card(environment):
    env, dataset = environment
    args = ("finetune", dataset, "--model", "sam_tiny", "--name", "mine", "--epochs", "4", "--lr", "1e-3",
            "--batch-size", "2", "--device", "cpu", "--clicks", "1")  # fmt: skip
    first = run_medfm(*args, env=env)
    assert first.returncode == 0, first.stderr
    rows = {line.split()[0]: line.split() for line in first.stdout.splitlines() if line.startswith(("base:", "new:"))}
    assert rows["base:"][1] == "sam_tiny" and rows["new:"][1] == "mine"
    dice_base, dice_new = float(rows["base:"][2]), float(rows["new:"][2])
    assert dice_new > dice_base + 0.3  # the cvpr25 final DSC on the validation case
    assert "epoch 4/4: loss" in first.stderr  # a line per epoch in a log
    listed = run_medfm("models", "list", env=env)
    assert "mine: fine-tuned from sam_tiny on 4 cases" in listed.stdout
    info = run_medfm("models", "info", "mine", env=env)
    assert '"evaluation"' in info.stdout and "phantom" not in info.stdout  # figures, never case names
    # The printed figures are the card's: what was measured is what was saved.
    card, _ = json.JSONDecoder().raw_decode(info.stdout.split("model card: ", 1)[1])
    dice = f"{card['validation_dice']['before']} -> {card['validation_dice']['after']}"
    assert f"validation Dice (box per slice) {dice}" in first.stdout


def test_user_errors_are_one_line(environment, tmp_path):
    env, dataset = environment
    cases = [
        (("finetune", dataset, "--model", "classic", "--name", "x"), "not a SAM-family model"),
        (("finetune", dataset, "--model", "sam_tiny", "--name", "sam_tiny"), "catalog model"),
        (("finetune", tmp_path / "nowhere", "--model", "sam_tiny", "--name", "x"), "does not exist"),
        (("finetune", dataset, "--model", "sam_tiny", "--name", "x", "--val-fraction", "1.5"), "--val-fraction"),
        (("finetune", dataset, "--model", "sam_tiny", "--name", "x", "--prompts", "box,lasso"), "Unknown prompt"),
    ]
    for args, expected in cases:
        result = run_medfm(*args, env=env)
        assert result.returncode == 1, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
