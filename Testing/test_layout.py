"""The house's layout: dependencies point downwards only, and Slicer installs every file MedFMLib needs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "MedFM" / "MedFMLib"

# What each part of MedFMLib may import from the rest of it (besides itself). Front ends (the CLI,
# the demo, benchmarks, test helpers) sit on top and may import anything.
MAY_IMPORT = {
    "errors": set(),
    "home": set(),
    "imaging": {"errors"},
    "models": {"errors", "home"},
    "engines": {"errors", "imaging", "models"},
    "interaction": {"errors", "imaging", "models", "engines"},
    # The server runs fine-tuning jobs for users whose GPU is on the server.
    "remote": {"errors", "home", "imaging", "models", "engines", "interaction", "training"},
    # Fine-tuning reads datasets as the evaluation does, and prepares slices as interactive sessions do.
    "training": {"errors", "home", "imaging", "models", "engines", "interaction", "evaluation"},
    # The scene side picks a local or a remote session, so it sits above both; it fine-tunes from segmentations.
    "mrml": {"errors", "imaging", "models", "engines", "interaction", "remote", "training"},
    # Ray: sessions in actors behind the server's own app, and batch pre-annotation of evaluation's datasets.
    "scale": {"errors", "home", "console", "cli_options", "imaging", "models", "engines", "interaction", "evaluation",
              "remote"},
}


def _part(module: str) -> str:
    """'MedFMLib.imaging.volume' -> 'imaging'; 'MedFMLib' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(LIBRARY.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every MedFMLib module a file imports, at any depth (lazy imports included), as absolute names."""
    module, is_package = _module_name(path)
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "MedFMLib" or target.startswith("MedFMLib."):
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "MedFMLib"]
    return found


def test_every_part_of_the_library_imports_only_downwards():
    wrong = []
    for path in sorted(LIBRARY.rglob("*.py")):
        own = _part(_module_name(path)[0])
        if own not in MAY_IMPORT:
            continue
        for line, target in _imports(path):
            other = _part(target)
            # The package itself holds only the version and the errors: anyone may import it.
            if other not in (own, "__init__") and other not in MAY_IMPORT[own]:
                wrong.append(f"{path.relative_to(LIBRARY)}:{line} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layering_check_sees_lazy_and_relative_imports(tmp_path):
    # The check above is only as good as its import finder: it must see imports inside functions.
    imports = dict((t, n) for n, t in _imports(LIBRARY / "engines" / "__init__.py"))
    assert "MedFMLib.models.store" in imports  # a lazy `from ..models.store import ModelStore`
    assert "MedFMLib.errors" in imports


def test_the_packages_folders_are_packages_and_no_module_is_too_long():
    for folder in [p for p in LIBRARY.rglob("*") if p.is_dir() and p.name != "__pycache__"]:
        if any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), folder
    lengths = {p.relative_to(LIBRARY): len(p.read_text(encoding="utf-8").splitlines()) for p in LIBRARY.rglob("*.py")}
    long = [f"{path} ({n})" for path, n in lengths.items() if n > 600]
    assert not long, f"modules over 600 lines: {long}"


def test_slicer_installs_every_data_file_of_the_library():
    cmake = (LIBRARY.parent / "CMakeLists.txt").read_text(encoding="utf-8")
    resources = set(re.findall(r"MedFMLib/\S+", cmake))
    data = {f"MedFMLib/{p.relative_to(LIBRARY).as_posix()}" for p in LIBRARY.rglob("*") if p.suffix == ".json"}
    assert data and data <= resources, f"not installed by CMake: {sorted(data - resources)}"
