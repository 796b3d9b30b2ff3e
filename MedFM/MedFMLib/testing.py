"""Tiny real models for tests and Slicer's self-test.

A SAM small enough to run in milliseconds on a CPU, built from
segment-anything's own classes and saved as the official checkpoints are (a
bare state dict), with a catalog file that registers it. Only the sizes
differ from the real models.
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


def write_tiny_sam_catalog(folder: str | Path, seed: int = 1234) -> Path:
    """Save a tiny SAM checkpoint and a catalog with ``sam_tiny`` (points, box) and ``medsam_tiny`` (box)."""
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
            parameter.mul_(3.0)
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
    catalog.write_text(json.dumps({"format": 1, "models": entries}))
    return catalog
