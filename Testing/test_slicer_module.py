"""Static checks of the Slicer-side files, which need Slicer's GUI to run (their behaviour is in the self-test)."""

from __future__ import annotations

import ast
import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedFM"
GUI_FILES = {
    MODULE / "MedFM.py": [MODULE / "Resources" / "UI" / "MedFM.ui"],
    MODULE / "SegmentEditorMedFMLib" / "SegmentEditorEffect.py": [
        MODULE / "Resources" / "UI" / "SegmentEditorMedFM.ui"
    ],
}
# GUI glue that MedFM.py imports (a package: Slicer takes every .py file beside MedFM.py for a module).
WIDGET_HELPERS = sorted((MODULE / "MedFMWidgetLib").glob("*.py"))
# What Slicer may import while it starts: Slicer, Qt, ctk, vtk, numpy and the standard library.
ALLOWED_AT_STARTUP = {"qt", "slicer", "vtk", "ctk", "numpy", "SegmentEditorEffects"}


def _ui_names(path: Path) -> set[str]:
    return {w.get("name") for w in ElementTree.parse(path).iter("widget")} | {
        w.get("name") for w in ElementTree.parse(path).iter("layout")
    }


def test_every_ui_element_the_code_names_exists_in_its_ui_file():
    for source, ui_files in GUI_FILES.items():
        names = set().union(*(_ui_names(f) for f in ui_files))
        used = set(re.findall(r"self\.ui\.(\w+)", source.read_text(encoding="utf-8")))
        assert used, source
        assert used <= names, f"{source.name} names UI elements missing from its .ui: {sorted(used - names)}"


def test_start_up_files_import_only_what_slicer_has():
    for source in [MODULE / "MedFM.py", *GUI_FILES, *WIDGET_HELPERS]:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.Import):
                modules = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [(node.module or "").split(".")[0]]
            else:
                continue
            for module in modules:
                assert module in ALLOWED_AT_STARTUP or module in sys.stdlib_module_names, (source.name, module)


def test_cmake_installs_every_gui_file_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    helpers = [p.relative_to(MODULE).as_posix() for p in WIDGET_HELPERS]
    assert "MedFMWidgetLib/FinetuneSection.py" in helpers
    for path in ["SegmentEditorMedFMLib/SegmentEditorEffect.py", "Resources/UI/SegmentEditorMedFM.ui", *helpers]:
        assert path in cmake and (MODULE / path).is_file()
    assert not [p.name for p in MODULE.glob("*.py") if p.name != "MedFM.py"], "helpers beside MedFM.py load as modules"
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for field in ["EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                  "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"]:  # fmt: skip
        assert re.search(rf"set\({field} \"[^\"]+\"\)", top), field
    for url in re.findall(r"https://raw.githubusercontent.com/medfm/SlicerMedFM/main/(\S+?)\"", top):
        assert (ROOT / url).is_file(), url  # the icon and screenshots the index shows exist in the repository


def test_extensions_index_entry():
    entry = json.loads((ROOT / "MedFM.json").read_text(encoding="utf-8"))
    assert entry["category"] == "Segmentation"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://github.com/")
    assert {"$schema", "scm_revision", "tier"} <= set(entry)


def test_the_effect_and_the_self_test_use_only_what_the_controller_has():
    """The effect is a skin over InteractionController: every command and state it names must exist there."""
    from MedFMLib.mrml.controller import InteractionController

    offered = set(dir(InteractionController(logic=None, editorNode=None)))
    for source in (MODULE / "SegmentEditorMedFMLib" / "SegmentEditorEffect.py", MODULE / "MedFM.py"):
        text = source.read_text(encoding="utf-8")
        tree = ast.parse(text)
        named = set(re.findall(r"(?<!mrml\.)controller\.(\w+)", text)) | set(re.findall(r"command\(\"(\w+)\"", text))
        for node in ast.walk(tree):  # the buttons' table: ("propagate", "up") and the like
            if isinstance(node, ast.Dict):
                named |= {v.elts[0].value for v in node.values if isinstance(v, ast.Tuple) and v.elts
                          and isinstance(v.elts[0], ast.Constant) and isinstance(v.elts[0].value, str)}  # fmt: skip
        assert named, source
        assert named <= offered, f"{source.name} names what the controller lacks: {sorted(named - offered)}"
