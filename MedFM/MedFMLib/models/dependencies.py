"""What each engine needs installed, and how Slicer should install it.

Nothing here installs anything: the Slicer module asks the user first, then
installs torch through the PyTorch extension (which picks the build that fits
the GPU driver) and the rest through Slicer's pip. Never at import time, and
never a plain ``pip install torch``, which would fetch a CPU-only or mismatched build.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Requirement:
    module: str  # what is imported
    pip_name: str  # what pip installs
    version: str = ""  # a pip version specifier, e.g. ">=2.1"
    via_pytorch_extension: bool = False  # torch and torchvision come from PyTorchUtils
    #: installed with its own dependencies (nnInteractive's ~60), with torch held at the installed version
    with_dependencies: bool = False

    @property
    def specifier(self) -> str:
        return f"{self.pip_name}{self.version}"


TORCH = Requirement("torch", "torch", ">=2.1", via_pytorch_extension=True)
TORCHVISION = Requirement("torchvision", "torchvision", ">=0.16", via_pytorch_extension=True)

ENGINE_REQUIREMENTS: dict[str, tuple[Requirement, ...]] = {
    "classic": (Requirement("SimpleITK", "SimpleITK", ">=2.2"),),
    # segment-anything declares no dependencies beyond torch/torchvision; --no-deps keeps pip away from torch.
    # scikit-image's random walker corrects a box-only model's mask around a click (click_corrections.py).
    "sam": (TORCH, TORCHVISION, Requirement("segment_anything", "segment-anything", ">=1.0"),
            Requirement("skimage", "scikit-image", ">=0.19", with_dependencies=True)),
    # sam2 is installed with --no-deps too (its torch>=2.5.1 pin must not replace Slicer's torch), so its
    # pure-Python dependencies are listed here.
    "sam2": (
        TORCH,
        TORCHVISION,
        Requirement("hydra", "hydra-core", ">=1.3.2"),
        Requirement("omegaconf", "omegaconf", ">=2.3"),
        Requirement("antlr4", "antlr4-python3-runtime", "==4.9.*"),
        Requirement("iopath", "iopath", ">=0.1.10"),
        Requirement("portalocker", "portalocker"),
        Requirement("tqdm", "tqdm", ">=4.66.1"),
        Requirement("yaml", "PyYAML"),
        Requirement("sam2", "sam2", ">=1.0"),
    ),
    # MONAI's VISTA3D transforms need scikit-image (merging clicks) and nibabel (orientation).
    "vista3d": (TORCH, Requirement("monai", "monai", ">=1.4"), Requirement("scipy", "scipy", ">=1.9"),
                Requirement("skimage", "scikit-image", ">=0.19"), Requirement("nibabel", "nibabel", ">=4")),
    # nnInteractive brings nnunetv2 and about 60 packages: they come with it, but torch stays Slicer's.
    "nninteractive": (TORCH, Requirement("nnInteractive", "nninteractive", ">=1.0", with_dependencies=True)),
    # Not an engine but a runtime for SAM-family encoders on the CPU (--runtime openvino, the module's Runtime).
    "openvino": (Requirement("openvino", "openvino", ">=2024.4"),),
}


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_requirements(engine: str) -> list[Requirement]:
    """The requirements of an engine that are not importable now."""
    return [r for r in ENGINE_REQUIREMENTS.get(engine, ()) if not is_installed(r.module)]


def install_plan(missing: list[Requirement]) -> tuple[bool, list[str]]:
    """(whether torch must come through the PyTorch extension, the pip specifiers for the rest)."""
    needs_torch = any(r.via_pytorch_extension for r in missing)
    return needs_torch, [r.specifier for r in missing if not r.via_pytorch_extension]


def pip_commands(missing: list[Requirement], constraints_folder: str | None = None) -> list[list[str]]:
    """The pip arguments that install what is missing, torch aside (the PyTorch extension's job).

    Packages without dependencies of their own go with ``--no-deps``, so pip never fetches a torch of its
    choosing. A package that needs its dependencies (nnInteractive) goes with a constraints file that holds
    torch and torchvision at the installed versions: pip then installs the rest, or refuses, but never
    replaces Slicer's torch.
    """
    plain = [r.specifier for r in missing if not r.via_pytorch_extension and not r.with_dependencies]
    commands = [["--no-deps", *plain]] if plain else []
    whole = [r.specifier for r in missing if r.with_dependencies]
    if whole:
        import importlib.metadata
        import tempfile
        from pathlib import Path

        pins = []
        for name in ("torch", "torchvision"):
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        folder = Path(constraints_folder or tempfile.mkdtemp(prefix="medfm-pip-"))
        constraints = folder / "keep-torch.txt"
        constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
        commands.append(["--constraint", str(constraints), *whole])
    return commands


def describe(missing: list[Requirement]) -> str:
    """One line for the confirmation dialog."""
    names = [r.pip_name for r in missing]
    return ", ".join(names)
