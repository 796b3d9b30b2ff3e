"""The model card of a fine-tuned model: where it comes from, what it was trained on, what it scored.

It holds counts and figures only: no file names, no case names (they are often patient identifiers), no
image data. A fine-tune inherits its base model's licence, and the card says so.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict


def make_card(base: str, base_info, train_set, train_cases, val_cases, config, result) -> dict:
    from .. import __version__

    settings = asdict(config)
    settings["prompts"] = list(settings["prompts"])
    return {
        "kind": "medfm fine-tune",
        "base_model": base,
        "license": base_info.license,
        "commercial_use": bool(base_info.commercial_use),
        "license_note": f"a fine-tune of {base} inherits its licence ({base_info.license})",
        "data": {
            "training_cases": len(train_cases),
            "validation_cases": len(val_cases),
            "training_slices": train_set.slice_count,
            "training_objects": len(train_set.objects),
        },
        "training": {**settings, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
                     "ended_by": result.reason},  # fmt: skip
        "validation_dice": {"before": round(result.dice_before, 4), "after": round(result.best_dice, 4),
                            "prompt": "the tight box of each object on each validation slice"},  # fmt: skip
        "date": datetime.date.today().isoformat(),
        "medfm_version": __version__,
    }

