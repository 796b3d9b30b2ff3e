"""Tiny real models for tests and Slicer's self-test.

A SAM and a SAM 2 small enough to run in milliseconds on a CPU, built from
segment-anything's and sam2's own classes and saved as the official
checkpoints are (SAM: a bare state dict; SAM 2: ``{"model": state_dict}``),
with a catalog file that registers them. Only the sizes differ from the real
models.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_SAM = {
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [1],
    "prompt_embed_dim": 32,
    "image_size": 256,
    "window_size": 4,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}


def write_tiny_sam_catalog(folder: str | Path, seed: int = 1234, decoder_scale: float = 3.0) -> Path:
    """Save a tiny SAM checkpoint and a catalog with ``sam_tiny`` (points, box) and ``medsam_tiny`` (box).

    ``decoder_scale`` spreads the decoder's random weights so that masks vary with prompts; fine-tuning tests
    take 1.0, the initialisation a network trains from.
    """
    import torch

    from .engines.sam import SamArchitecture, build_sam_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(TINY_SAM, encoder_global_attn_indexes=tuple(TINY_SAM["encoder_global_attn_indexes"]))
    torch.manual_seed(seed)
    model = build_sam_model(SamArchitecture(**params))
    # Random init leaves the decoder's output near zero; spread the weights so masks vary with prompts.
    with torch.no_grad():
        for parameter in model.mask_decoder.parameters():
            parameter.mul_(decoder_scale)
    torch.save(model.state_dict(), folder / "sam_tiny.pth")
    entries = []
    for name, preprocessing, prompts in (("sam_tiny", "sam", ["point", "box"]), ("medsam_tiny", "medsam", ["box"])):
        entries.append(
            {
                "name": name,
                "engine": "sam",
                "arch": "vit_tiny",
                "preprocessing": preprocessing,
                "task": "general",
                "prompts": prompts,
                "input_size": TINY_SAM["image_size"],
                "license": "Apache-2.0",
                "commercial_use": True,
                "homepage": "https://example.invalid/tests",
                "filename": "sam_tiny.pth",
                "sam_architecture": TINY_SAM,
            }
        )
    catalog = folder / "catalog.json"
    catalog.write_text(json.dumps({"format": 1, "models": entries}), encoding="utf-8")
    return catalog


# Hydra overrides that shrink sam2's own SAM 2.1 tiny config: a 128-pixel input,
# a narrow six-block Hiera trunk and one memory-attention layer.
TINY_SAM2_OVERRIDES = [
    "++model.image_size=128",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,2,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[2,4]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_encoder.fuser.num_layers=1",
]


def write_tiny_sam2_catalog(folder: str | Path, seed: int = 1234, decoder_scale: float = 3.0) -> Path:
    """Save a tiny SAM 2.1 checkpoint (``sam2_tiny.pt``) and a catalog with ``sam2_tiny`` (``decoder_scale``: as
    for SAM)."""
    import torch

    from .engines.sam2 import build_sam2_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_sam2_model("sam2.1_hiera_t", TINY_SAM2_OVERRIDES)
    with torch.no_grad():
        for parameter in model.sam_mask_decoder.parameters():
            parameter.mul_(decoder_scale)
        # Random weights would call the object absent on every slice; say it is present, so masks vary.
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(8.0)
    torch.save({"model": model.state_dict()}, folder / "sam2_tiny.pt")
    entry = {
        "name": "sam2_tiny",
        "engine": "sam2",
        "arch": "sam2.1_hiera_t",
        "task": "general",
        "prompts": ["point", "box", "mask"],
        "input_size": 128,
        "license": "Apache-2.0",
        "commercial_use": True,
        "homepage": "https://example.invalid/tests",
        "filename": "sam2_tiny.pt",
        "sam2_overrides": TINY_SAM2_OVERRIDES,
    }
    catalog = folder / "catalog.json"
    catalog.write_text(json.dumps({"format": 1, "models": [entry]}), encoding="utf-8")
    return catalog


def write_tiny_volume_catalog(folder: str | Path, seed: int = 0) -> Path:
    """A tiny nnInteractive model folder and a tiny VISTA3D checkpoint, with a catalog that names them.

    ``nninteractive_tiny``: a 4-stage residual-encoder U-Net (64³ patch) in nnInteractive's own folder layout,
    AutoZoom off (random weights would zoom out at every click); ``vista3d_tiny``: MONAI's VISTA3D with
    ``encoder_embed_dim=8`` (6M parameters, the full model's key names). Import them with
    ``ModelStore.import_file(folder / "nninteractive_tiny", "nninteractive_tiny")`` and
    ``import_file(folder / "vista3d_tiny.pt", "vista3d_tiny")``.
    """
    from .engines.nninteractive import write_random_model_folder
    from .engines.vista3d import save_random_vista3d

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_random_model_folder(folder / "nninteractive_tiny", size="tiny", seed=seed)
    save_random_vista3d(folder / "vista3d_tiny.pt", embed_dim=8, seed=seed)
    base = "https://example.invalid/nninteractive/"
    common = {"task": "medical", "license": "CC-BY-NC-SA-4.0", "commercial_use": False,
              "homepage": "https://example.invalid/tests"}  # fmt: skip
    entries = [
        dict(common, name="nninteractive_tiny", engine="nninteractive", arch="nnInteractive_v1.0",
             prompts=["point", "box", "scribble", "lasso", "mask"], filename="checkpoint_final.pth",
             subfolder="fold_0", url=base + "fold_0/checkpoint_final.pth",
             companions=[{"path": name, "url": base + name}
                         for name in ("plans.json", "dataset.json", "inference_session_class.json")],
             engine_options={"autozoom": False, "random_size": "tiny"}),
        dict(common, name="vista3d_tiny", engine="vista3d", arch="vista3d132",
             prompts=["point", "box", "class", "mask"], filename="vista3d_tiny.pt",
             license="NVIDIA-OneWay-Noncommercial", engine_options={"embed_dim": 8, "roi_size": 64}),
    ]  # fmt: skip
    catalog = folder / "catalog.json"
    catalog.write_text(json.dumps({"format": 1, "models": entries}), encoding="utf-8")
    return catalog


def phantom_cases(count: int, seed: int = 0, dims=(40, 40, 12)):
    """``count`` phantom cases (``MemoryCase``): a noisy bright ellipsoid of random place and size in a darker
    body, on an anisotropic LPS grid, labelled 1; for fine-tuning tests."""
    import numpy as np

    from .imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
    from .training.embeddings import MemoryCase

    cases = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        matrix = make_ijk_to_ras((1.0, 1.0, 2.0), (10.0, -5.0, 3.0), (0, 0, 0), (-1, -1, 1))
        centre_ijk = np.array(dims, float) / 2 + rng.uniform(-4, 4, 3) * (1, 1, 0.5)
        centre = matrix[:3, :3] @ centre_ijk + matrix[:3, 3]
        radii = (rng.uniform(6, 10), rng.uniform(6, 10), 8.0)
        volume, masks = render(dims, matrix, [Ellipsoid(tuple(centre), radii, 200.0)], background=20.0,
                               noise_sd=15.0, name=f"phantom{index}")  # fmt: skip
        cases.append(MemoryCase(f"phantom{index}", volume, masks[0].astype(np.int32)))
    return cases


def write_phantom_dataset(folder: str | Path, count: int, seed: int = 0) -> Path:
    """The phantom cases as a Medical Segmentation Decathlon folder (imagesTr/labelsTr, NIfTI)."""
    from .imaging.io import write_labelmap, write_volume

    folder = Path(folder)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in phantom_cases(count, seed):
        write_volume(folder / "imagesTr" / f"{case.name}_0000.nii.gz", case.volume)
        write_labelmap(folder / "labelsTr" / f"{case.name}.nii.gz", case.labels.astype("uint8"), case.volume)
    return folder
