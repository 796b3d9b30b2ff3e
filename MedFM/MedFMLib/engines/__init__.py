"""Segmentation engines behind one small interface, created by model name."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from .base import Embedding, Engine, Prediction, Prompts2D
from .cpu_memory import keep_freed_memory
from .device import resolve_device
from .runtime import resolve_runtime

__all__ = ["Embedding", "Engine", "Prediction", "Prompts2D", "create_engine", "resolve_device"]


def _weights_id(checkpoint: Path) -> str:
    # Cheap identity (no hashing of a 2.5 GB file on every start); the model
    # store verifies content separately.
    stat = checkpoint.stat()
    return f"{checkpoint.name}:{stat.st_size}:{stat.st_mtime_ns}"


def create_engine(
    model: str,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    random_weights: bool = False,
    seed: int = 0,
    store=None,
    progress=None,
    runtime: str = "torch",
    fast: bool = False,
    notify=None,
    zoom: bool | None = None,
) -> Engine:
    """Create the engine for a catalog model.

    ``random_weights`` builds the full-size network with random weights: it
    costs the same time and memory as the trained one, for benchmarks and tests.
    Without a ``checkpoint`` the model store provides the file, downloading it
    on first use (``progress`` receives download progress). ``runtime`` (auto,
    torch, openvino) picks what runs a SAM-family image encoder; ``fast`` lets
    OpenVINO use bf16 where the CPU has it; ``notify`` hears of a first conversion. ``zoom`` turns the
    small-object zoom on the user's slices (interaction/zoom.py) on or off; None keeps the catalog's setting.
    """
    from ..models.store import ModelStore

    store = store if store is not None else ModelStore()
    info = store.info(model)
    if info.engine == "classic":
        from .classic import ClassicEngine

        return ClassicEngine()
    options = (checkpoint, device, random_weights, seed, store, progress, runtime, fast, notify)
    engine = _create_torch_engine(model, info, *options)
    if zoom is not None:
        engine.zooms_on_small_objects = bool(zoom)
    if getattr(engine, "device", "") == "cpu":
        keep_freed_memory()  # a third of a CPU encode went on faulting fresh pages in (cpu_memory.py)
    return engine


def _create_torch_engine(model, info, checkpoint, device, random_weights, seed, store, progress, runtime, fast, notify):
    """A SAM-family, SAM 2 or 3D engine: ``create_engine``'s arguments, the catalog entry read."""
    if info.engine == "sam2":
        return _create_sam2_engine(info, checkpoint, device, random_weights, seed, store, progress)
    if info.kind == "volume":
        return _create_volume_engine(info, checkpoint, device, random_weights, seed, store, progress)
    if info.engine != "sam":
        raise ModelError(f"Model '{model}' needs the '{info.engine}' engine, which this MedFM does not have.")
    try:
        import segment_anything  # noqa: F401
        import torch
    except ImportError as exc:
        raise ModelError(
            f"Model '{model}' needs PyTorch and segment-anything ({exc.name} is missing); "
            "install them with: pip install 'medfm[sam]'"
        ) from None
    from .sam import (
        SamArchitecture,
        SamEngine,
        build_sam_model,
        get_architecture,
        load_sam_model,
        register_architecture,
    )

    if info.sam_architecture:
        params = dict(info.sam_architecture)
        params["encoder_global_attn_indexes"] = tuple(params.get("encoder_global_attn_indexes", ()))
        try:
            register_architecture(info.arch, SamArchitecture(**params))
        except TypeError as exc:
            raise ModelError(f"Catalog entry '{model}' has a bad sam_architecture: {exc}.") from None
    # OpenVINO runs on the CPU: asked for by name, "auto" must not pick a GPU it cannot use.
    resolved = "cpu" if runtime == "openvino" and device == "auto" else resolve_device(device)
    if random_weights:
        torch.manual_seed(seed)
        network, weights_id = build_sam_model(get_architecture(info.arch)), f"random{seed}"
    else:
        checkpoint = Path(checkpoint) if checkpoint is not None else store.checkpoint(model, progress=progress)
        network, weights_id = load_sam_model(info.arch, checkpoint, model_name=model), _weights_id(checkpoint)
    engine = SamEngine(
        network,
        model_name=model,
        device=resolved,
        preprocessing=info.preprocessing,
        weights_id=weights_id,
        prompt_types=info.prompts,
    )
    engine.zooms_on_small_objects = bool((info.engine_options or {}).get("zoom_small_objects", False))
    if resolve_runtime(runtime, resolved) == "openvino":
        engine.use_openvino(store.home / "openvino", fast=fast, notify=notify)
    return engine


_EXTRAS = {"vista3d": ("monai", "vista3d"), "nninteractive": ("nnInteractive", "nninteractive")}


def _create_volume_engine(info, checkpoint, device, random_weights, seed, store, progress):
    """nnInteractive or VISTA3D: a native 3D engine (``volumetric.VolumeEngine``)."""
    module, extra = _EXTRAS[info.engine]
    try:
        import torch

        __import__(module)
    except ImportError as exc:
        raise ModelError(
            f"Model '{info.name}' needs PyTorch and {module} ({exc.name} is missing); "
            f"install them with: pip install 'medfm[{extra}]'"
        ) from None
    options = dict(info.engine_options or {})
    resolved = resolve_device(device)
    if info.engine == "vista3d":
        from .vista3d import Vista3DEngine, build_vista3d_network, load_vista3d_network

        embed_dim = int(options.get("embed_dim", 48))
        if random_weights:
            torch.manual_seed(seed)
            network = build_vista3d_network(embed_dim)
        else:
            path = Path(checkpoint) if checkpoint is not None else store.checkpoint(info.name, progress=progress)
            network = load_vista3d_network(path, embed_dim=embed_dim)
        # The sliding window's edge (the bundle's 128 voxels at 1.5 mm); a small test model may use less.
        return Vista3DEngine(network, device=resolved, model_name=info.name, roi_size=int(options.get("roi_size", 128)))
    from .nninteractive import NNInteractiveEngine, write_random_model_folder

    autozoom = bool(options.get("autozoom", True))
    if random_weights:
        # Random weights send AutoZoom into minutes of zooming out: benchmarks run without it.
        folder = store.home / "random-models" / f"{info.name}-{seed}"
        if not (folder / "plans.json").is_file():
            write_random_model_folder(folder, size=options.get("random_size", "full"), seed=seed)
        autozoom = False
    elif checkpoint is not None:
        folder = Path(checkpoint)
        folder = folder if folder.is_dir() else folder.parent.parent  # given fold_0/checkpoint_final.pth
    else:
        store.checkpoint(info.name, progress=progress)
        folder = store.folder(info.name)
    return NNInteractiveEngine.from_folder(folder, device=resolved, autozoom=autozoom, model_name=info.name)


def _create_sam2_engine(info, checkpoint, device, random_weights, seed, store, progress) -> Engine:
    try:
        import sam2  # noqa: F401
        import torch
    except ImportError as exc:
        raise ModelError(
            f"Model '{info.name}' needs PyTorch and sam2 ({exc.name} is missing); "
            "install them with: pip install 'medfm[sam2]'"
        ) from None
    from .sam2 import Sam2Engine, build_sam2_model, load_sam2_model

    resolved = resolve_device(device)
    if random_weights:
        torch.manual_seed(seed)
        network, weights_id = build_sam2_model(info.arch, info.sam2_overrides), f"random{seed}"
    else:
        checkpoint = Path(checkpoint) if checkpoint is not None else store.checkpoint(info.name, progress=progress)
        network = load_sam2_model(info.arch, checkpoint, info.sam2_overrides, model_name=info.name)
        weights_id = _weights_id(checkpoint)
    return Sam2Engine(network, model_name=info.name, device=resolved, weights_id=weights_id, prompt_types=info.prompts)
