"""What each engine needs, checked against the packages really importable here."""

from __future__ import annotations

import importlib

from MedFMLib.models.dependencies import (
    ENGINE_REQUIREMENTS,
    Requirement,
    install_plan,
    is_installed,
    missing_requirements,
)
from MedFMLib.models.store import ModelStore


def test_every_catalog_engine_has_requirements_that_name_importable_modules():
    engines = {info.engine for info in ModelStore().models().values()}
    assert engines <= set(ENGINE_REQUIREMENTS)
    # In this test environment the classic and SAM engines are installed: nothing is missing.
    assert missing_requirements("classic") == [] and missing_requirements("sam") == []
    for requirement in ENGINE_REQUIREMENTS["sam"]:
        importlib.import_module(requirement.module)


def test_torch_goes_through_the_pytorch_extension_and_the_rest_through_pip():
    missing = [*ENGINE_REQUIREMENTS["sam"], Requirement("not_a_real_module_xyz", "not-a-real-package")]
    needs_torch, pip = install_plan(missing)
    assert needs_torch
    assert pip == ["segment-anything>=1.0", "scikit-image>=0.19", "not-a-real-package"]
    assert not any(p.startswith(("torch", "torchvision")) for p in pip)
    assert [r.module for r in missing if not is_installed(r.module)] == ["not_a_real_module_xyz"]
