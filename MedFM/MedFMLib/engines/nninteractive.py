"""nnInteractive (MIC-DKFZ) behind MedFM's volume-engine interface.

nnInteractive's ``nnInteractiveInferenceSession`` does the work: it keeps the
whole volume, a stack of interaction channels and a target buffer that every
``add_*_interaction`` writes in place. This module only translates MedFM's
interactions into its calls and its answers into ``VolumePrediction``s.

- Axis order: the session uses plain indices into the array it is given, so
  our (K, J, I) arrays and coordinates go in as they are. The model ignores
  voxel spacing (it was trained in voxel space), so the IJK→RAS matrix plays no
  part here.
- Loading: the checkpoint is first read by us with ``weights_only=True`` (no
  code can run), which also gives a one-line error for a truncated or wrong
  file; only then does nnInteractive read it again with its own unrestricted
  ``torch.load``.
- Side effects: nnInteractive prints progress and calls
  ``torch.set_num_threads`` globally. Every call into it runs with stdout
  redirected and the previous thread count restored afterwards, so a host
  application (3D Slicer) keeps its own setting. The redirect swaps
  ``sys.stdout`` for the whole process, so other threads' prints during a
  call are swallowed as well.
- Imports: torch and nnInteractive are imported inside the functions, never
  when this module is imported.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeviceError, ModelError, PromptError, VolumeError
from ..imaging.drawing import lasso_mask, polyline_voxels
from ..imaging.volume import Volume
from .volumetric import BOX, LASSO, MASK, POINT, SCRIBBLE, Interaction, VolumeEngine, VolumePrediction

#: files of a model folder in the official layout (Hugging Face MIC-DKFZ/nnInteractive, folder nnInteractive_v1.0)
PLANS_FILE, DATASET_FILE, CHECKPOINT_FILE = "plans.json", "dataset.json", "checkpoint_final.pth"
#: the session settings: the newer name first; v1.0 ships the legacy one
SESSION_FILES = ("inference_info.json", "inference_session_class.json")
LICENSE_FILE = "LICENSE"
#: the configuration the published v1.0 checkpoint was trained with
OFFICIAL_CONFIGURATION = "3d_fullres_ps192_bs24"
_TRAINER = "nnInteractiveTrainer_stub"


def _hints(model_name: str) -> str:
    return (
        f"download it again with `medfm models download {model_name}` or import the folder with "
        f"`medfm models import FOLDER --name {model_name}`"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_call(threads: int | None):
    """Run nnInteractive code without its prints, and leave torch's global thread count as it was.

    ``threads`` (when given) is the count nnInteractive's own work runs with; the host's count returns afterwards.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _numpy_safe_globals() -> list:
    """The numpy types nnU-Net checkpoints pickle (float64 training logs, their dtypes), named as numpy 1 and 2 save
    them. Reconstructing them runs no user code, so they may pass a ``weights_only`` load."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.dtype, np.ndarray]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


def _read_json(path: Path, model_name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"'{path}' is not readable JSON ({_first_line(exc)}); {_hints(model_name)}.") from None


def _fold_folder(folder: Path) -> Path | None:
    """fold_0 as published, else the only fold_* folder with a checkpoint (nnInteractive refuses several)."""
    if (folder / "fold_0" / CHECKPOINT_FILE).is_file():
        return folder / "fold_0"
    folds = sorted(p for p in folder.glob("fold_*") if (p / CHECKPOINT_FILE).is_file())
    return folds[0] if len(folds) == 1 else None


def check_model_folder(folder: Path, model_name: str = "nninteractive") -> tuple[Path, dict]:
    """Check a model folder without building anything: the fold folder to use and the checkpoint (read safely).

    Raises a one-line ModelError that names what is missing or broken.
    """
    import torch

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"The nnInteractive model folder '{folder}' does not exist; {_hints(model_name)}.")
    fold = _fold_folder(folder)
    missing = [name for name in (PLANS_FILE, DATASET_FILE) if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in SESSION_FILES):
        missing.append(" or ".join(SESSION_FILES))
    if fold is None:
        several = len(list(folder.glob(f"fold_*/{CHECKPOINT_FILE}"))) > 1
        missing.append(f"one fold_*/{CHECKPOINT_FILE} (found several)" if several else f"fold_0/{CHECKPOINT_FILE}")
    if missing:
        raise ModelError(f"The nnInteractive folder '{folder}' lacks {', '.join(missing)}; {_hints(model_name)}.")
    plans = _read_json(folder / PLANS_FILE, model_name)
    dataset = _read_json(folder / DATASET_FILE, model_name)
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise ModelError(f"'{folder / PLANS_FILE}' holds no nnU-Net configurations; {_hints(model_name)}.")
    if not isinstance(dataset, dict) or "labels" not in dataset:
        raise ModelError(f"'{folder / DATASET_FILE}' holds no labels; {_hints(model_name)}.")

    path = fold / CHECKPOINT_FILE
    try:
        # mmap: the tensors are not read here, only the pickle; nnInteractive reads the file again right after.
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch.load raises a dozen different types on junk input
        if isinstance(exc, MemoryError):
            raise
        text = str(exc)
        unsafe = re.search(r"GLOBAL ([\w.]+)", text)
        reason = f"it holds Python objects that are not weights ({unsafe.group(1)})" if unsafe else _first_line(exc)
        raise ModelError(
            f"'{path}' is not a readable nnInteractive checkpoint: {reason}; it may be truncated or the wrong file: "
            f"{_hints(model_name)}."
        ) from None
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    configuration = (checkpoint.get("init_args") or {}).get("configuration") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise ModelError(
            f"'{path}' holds no network_weights; it is not an nnInteractive checkpoint: {_hints(model_name)}."
        )
    if not isinstance(checkpoint.get("trainer_name"), str) or not isinstance(configuration, str):
        raise ModelError(f"'{path}' lacks trainer_name or init_args.configuration; {_hints(model_name)}.")
    if configuration not in plans["configurations"]:
        raise ModelError(
            f"'{path}' was trained with configuration '{configuration}', which '{PLANS_FILE}' does not describe "
            f"(it has {', '.join(plans['configurations']) or 'none'}); {_hints(model_name)}."
        )
    return fold, checkpoint


def _describe_load_error(exc: BaseException) -> str:
    """A short reason for a failed nnInteractive load; a state-dict mismatch is counted rather than listed."""
    text = str(exc)
    if "Error(s) in loading state_dict" in text:
        counts = []
        for label, pattern in (("missing", r"Missing key\(s\)[^\n]*"), ("unexpected", r"Unexpected key\(s\)[^\n]*")):
            found = re.search(pattern, text)
            if found:
                counts.append(f"{found.group(0).count(chr(34)) // 2} {label}")
        shapes = text.count("size mismatch")
        if shapes:
            counts.append(f"{shapes} of the wrong shape")
        return f"the weights do not fit the network that plans.json describes ({', '.join(counts)} tensors)"
    return _first_line(exc)


class NNInteractiveEngine(VolumeEngine):
    """nnInteractive: points, 2D boxes, scribbles, lassos and initial masks, each answered with a 3D mask.

    Interactions accumulate on the current object, as the model was trained; ``start_object`` starts over.
    """

    interactions = (POINT, BOX, SCRIBBLE, LASSO, MASK)

    def __init__(self, session, device: str, threads: int | None, model_name: str = "nninteractive") -> None:
        self._session = session
        self.device = device
        self.model_name = model_name
        self._threads = threads
        self._shape: tuple[int, int, int] | None = None
        self._target: np.ndarray | None = None

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        device: str = "cpu",
        autozoom: bool = True,
        threads: int | None = None,
        model_name: str = "nninteractive",
    ) -> NNInteractiveEngine:
        """Load a model folder in the official layout (see ``check_model_folder``).

        ``autozoom`` lets nnInteractive zoom out when an object reaches the patch border (as its GUIs do). With random
        weights it zooms out on every click and a click costs minutes, so tests and benchmarks pass False.
        ``threads``: torch threads for nnInteractive's work (default: whatever the host has set).
        """
        from .device import resolve_device

        device = resolve_device(device)
        try:
            import torch

            with _quiet_call(threads):  # its dependencies may print on import
                from nnInteractive.inference.inference_session import nnInteractiveInferenceSession
        except ImportError as exc:
            raise ModelError(
                f"nnInteractive needs the nninteractive package ({exc.name} is missing); install it with "
                "`pip install nninteractive`."
            ) from None
        folder = Path(folder)
        fold, checkpoint = check_model_folder(folder, model_name)
        del checkpoint  # its tensors were only mapped, never read
        with _quiet_call(threads):
            session = nnInteractiveInferenceSession(
                device=torch.device(device),
                use_torch_compile=False,
                verbose=False,
                # nnInteractive sets this count globally; _quiet_call puts the host's back when the call returns
                torch_n_threads=threads or torch.get_num_threads(),
                do_autozoom=autozoom,
            )
            try:
                session.initialize_from_trained_model_folder(str(folder), use_fold=fold.name[len("fold_") :])
            except Exception as exc:
                if isinstance(exc, MemoryError):
                    raise
                session.executor.shutdown(wait=False)
                raise ModelError(
                    f"nnInteractive could not load '{folder}': {_describe_load_error(exc)}; {_hints(model_name)}."
                ) from None
        return cls(session, device, threads, model_name)

    # ------------------------------------------------------------------ the volume and the object
    @property
    def license(self) -> str | None:
        """The weights' licence as nnInteractive reads it (the folder's LICENSE file, first line)."""
        return getattr(self._session, "license", None)

    @property
    def mask(self) -> np.ndarray:
        """The current object's whole mask (K, J, I) bool: a copy of nnInteractive's target buffer."""
        self._require_volume()
        return self._target.astype(bool)

    def set_volume(self, volume: Volume) -> None:
        """Hand the raw intensities over (nnInteractive z-scores them itself); spacing and orientation are not used."""
        array = volume.array
        if not np.any(array):
            raise VolumeError(f"{volume.name}: the volume is all zeros; nnInteractive needs an image to segment.")
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise VolumeError(f"{volume.name}: the volume has NaN or infinite voxels; fix or resample it first.")
        if array.min() == array.max():
            raise VolumeError(f"{volume.name}: every voxel has the same value; nnInteractive needs contrast.")
        session = self._live_session()
        with _quiet_call(self._threads):
            session.set_image(array[None])
            # set_image preprocesses in a background thread; wait here so that its prints are still silenced and
            # its cost shows up in this call, not in the first click
            finish = getattr(session, "_finish_preprocessing_and_initialize_interactions", None)
            if finish is not None:
                finish()
            # set_image forgets the target buffer, so it is set after it
            self._target = np.zeros(array.shape, dtype=np.uint8)
            session.set_target_buffer(self._target)
        self._shape = tuple(int(n) for n in array.shape)

    def start_object(self, initial_mask: np.ndarray | None = None) -> VolumePrediction | None:
        """Forget all interactions and empty the mask; with ``initial_mask`` the new object starts from it.

        The initial mask is taken as it is (not re-segmented): the answer is the whole mask as the engine now holds it.
        Refining a mask with the model is the ``mask`` interaction.
        """
        self._require_volume()
        session = self._live_session()
        initial = None if initial_mask is None else self._whole_mask(initial_mask)  # a wrong mask changes nothing
        with _quiet_call(self._threads):
            session.reset_interactions()
            self._target.fill(0)  # reset_interactions does this too; an empty object must not depend on that
            if initial is None or not initial.any():
                return None
            self._call(session.add_initial_seg_interaction, initial, run_prediction=False)
        return VolumePrediction(self._target.astype(bool))

    def interact(self, interaction: Interaction) -> VolumePrediction:
        """Add the interaction to the current object; the answer is the region nnInteractive rewrote."""
        self._require_volume()
        self.check(interaction, self._shape)
        session = self._live_session()
        kind, positive = interaction.kind, bool(interaction.positive)
        with _quiet_call(self._threads):
            if kind == POINT:
                point = np.clip(np.rint(interaction.points[0]), 0, np.asarray(self._shape) - 1).astype(int)
                bbox = self._call(
                    session.add_point_interaction, tuple(int(c) for c in point), include_interaction=positive
                )
            elif kind == BOX:
                bbox = self._call(session.add_bbox_interaction, self._box(interaction), include_interaction=positive)
            elif kind == SCRIBBLE:
                image, region = self._stroke(interaction.points)
                bbox = self._call(
                    session.add_scribble_interaction, image, include_interaction=positive, interaction_bbox=region
                )
            elif kind == LASSO:
                image, region = _crop_to_content(lasso_mask(interaction.points, self._shape))
                bbox = self._call(
                    session.add_lasso_interaction, image, include_interaction=positive, interaction_bbox=region
                )
            else:  # MASK: replaces every earlier interaction, and the whole buffer with it
                initial = self._whole_mask(interaction.mask)
                if not initial.any():
                    raise PromptError("The initial mask is empty; paint the object or click on it instead.")
                self._call(session.add_initial_seg_interaction, initial, run_prediction=True)
                bbox = None
        if bbox is None:
            return VolumePrediction(self._target.astype(bool))
        region = tuple(slice(int(lo), int(hi)) for lo, hi in bbox)
        return VolumePrediction(self._target[region].astype(bool), tuple(int(lo) for lo, _ in bbox))

    def close(self) -> None:
        """Let go of the session, its volume copies and its worker threads."""
        session, self._session, self._target, self._shape = self._session, None, None, None
        if session is not None:
            session.executor.shutdown(wait=True)
            del session
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ helpers
    def _live_session(self):
        if self._session is None:
            raise ModelError(f"The {self.model_name} engine was closed; load the model again.")
        return self._session

    def _require_volume(self) -> None:
        if self._shape is None:
            raise PromptError(f"{self.model_name} has no volume yet; load a volume before segmenting.")

    def _whole_mask(self, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != self._shape:
            raise PromptError(
                f"The initial mask has shape {mask.shape} but the volume {self._shape}; use a mask of this volume."
            )
        return mask.astype(np.uint8)

    def _call(self, method, *args, **kwargs):
        """Call into the session; its errors about a prompt become one-line PromptErrors."""
        import torch

        try:
            return method(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise DeviceError(
                f"{self.device} ran out of memory in nnInteractive; close other programs, crop the volume or use "
                "the CPU."
            ) from None
        except (ValueError, AssertionError) as exc:
            raise PromptError(f"nnInteractive refused the prompt: {_first_line(exc)}") from None

    def _box(self, interaction: Interaction) -> list[list[int]]:
        """Our box (first and last voxel, inclusive) as nnInteractive's [[start, stop), ...] per axis."""
        first, last = interaction.points
        bounds = []
        for axis, size in enumerate(self._shape):
            if last[axis] - first[axis] < 0.5:  # the axis the box was drawn across: exactly one slice
                start = int(np.clip(np.rint((first[axis] + last[axis]) / 2), 0, size - 1))
                stop = start + 1
            else:
                start = int(np.clip(np.rint(first[axis]), 0, size - 1))
                stop = int(np.clip(np.rint(last[axis]), 0, size - 1)) + 1
            bounds.append([start, stop])
        flat = any(stop - start == 1 for start, stop in bounds)
        if not flat and not self._session.supported_interactions.get("bbox3d", False):
            raise PromptError("nnInteractive v1.0 takes boxes drawn on one slice; draw the box in one view.")
        return bounds

    def _stroke(self, points: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
        """A scribble as nnInteractive's GUIs paint it: the drawn line with a brush of the model's preferred width.

        The brush widens the line within its slice only (napari uses the width for the axis not displayed); a stroke
        that leaves its slice is widened along every axis. Only the stroke's bounding box is handed over.
        """
        thickness = list(getattr(self._session, "preferred_scribble_thickness", None) or [1, 1, 1])
        spread = np.ptp(np.asarray(points, dtype=np.float64).reshape(-1, 3), axis=0)
        flat = np.flatnonzero(spread < 0.5)
        if len(flat):
            axis = int(flat[np.argmin(spread[flat])])
            brush = [1 if a == axis else max(1, int(thickness[axis])) for a in range(3)]
        else:
            brush = [max(1, int(t)) for t in thickness]
        voxels = polyline_voxels(points, self._shape)
        shape = np.asarray(self._shape)
        low = np.maximum(voxels.min(axis=0) - np.asarray(brush) // 2, 0)
        high = np.minimum(voxels.max(axis=0) + np.asarray(brush), shape)
        image = np.zeros(tuple(high - low), dtype=np.uint8)
        for offset in np.ndindex(*brush):
            # a brush of width w covers w voxels around the line: offsets -(w // 2) ... w - 1 - w // 2
            placed = voxels - low + np.asarray(offset) - np.asarray(brush) // 2
            inside = np.all((placed >= 0) & (placed < image.shape), axis=1)
            image[tuple(placed[inside].T)] = 1
        return _crop_to_content(image, low)

    def __repr__(self) -> str:
        return f"NNInteractiveEngine({self.model_name!r}, device={self.device!r})"


def _crop_to_content(mask: np.ndarray, offset=(0, 0, 0)) -> tuple[np.ndarray, list[list[int]]]:
    """The smallest box around a mask's set voxels, as (crop uint8, [[start, stop), ...] in volume voxels)."""
    bounds = []
    for axis in range(3):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(occupied) == 0:
            raise PromptError("The drawing covers no voxel of the volume; draw it on the image.")
        bounds.append((int(occupied[0]), int(occupied[-1]) + 1))
    crop = np.ascontiguousarray(mask[tuple(slice(lo, hi) for lo, hi in bounds)], dtype=np.uint8)
    return crop, [[lo + int(o), hi + int(o)] for (lo, hi), o in zip(bounds, offset)]


# ---------------------------------------------------------------------- random-weight model folders
#: (features per stage, residual blocks per stage, patch size, configuration name)
_RANDOM_SIZES = {
    "tiny": ([4, 8, 16, 32], [1, 1, 1, 1], [64, 64, 64], "3d_fullres_medfm_tiny"),
    # ResEnc-L as published in v1.0: 6 stages, 32..320 features, 192³ patch (956 state-dict entries)
    "full": ([32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6], [192, 192, 192], OFFICIAL_CONFIGURATION),
}


def _random_plans(size: str) -> dict:
    features, blocks, patch, configuration = _RANDOM_SIZES[size]
    stages = len(features)
    return {
        "dataset_name": "Dataset999_MedFMRandomWeights",
        "plans_name": "nnUNetResEncUNetLPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": patch,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "nnUNetPlannerResEncL",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1.0,
                "mean": 0.0,
                "median": 0.0,
                "min": -1.0,
                "percentile_00_5": -1.0,
                "percentile_99_5": 1.0,
                "std": 1.0,
            }
        },
        "configurations": {
            configuration: {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": patch,
                "median_image_size_in_voxels": patch,
                "spacing": [1.0, 1.0, 1.0],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                    "arch_kwargs": {
                        "n_stages": stages,
                        "features_per_stage": features,
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * stages,
                        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
                        "n_blocks_per_stage": blocks,
                        "n_conv_per_stage_decoder": [1] * (stages - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
    }


def write_random_model_folder(folder: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a model folder in the official layout with random weights; returns ``folder``.

    "tiny" is a 4-stage network (4–32 features, 81k parameters) with a 64³ patch (a patch of 48 or less breaks
    nnInteractive's refinement, which keeps a 24-voxel margin); "full" is the published v1.0 architecture (ResEnc-L,
    192³ patch, 8 input channels, a 411 MB checkpoint), for timing and memory. Random weights make AutoZoom zoom out
    on nearly every click, which costs minutes: load such a folder with ``autozoom=False``.
    """
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if size not in _RANDOM_SIZES:
        raise ModelError(f"Unknown random nnInteractive size '{size}'; use one of {', '.join(_RANDOM_SIZES)}.")
    folder = Path(folder)
    plans = _random_plans(size)
    configuration = _RANDOM_SIZES[size][3]
    dataset = {
        "channel_names": {"0": "image"},
        "labels": {"background": 0, "object": 1},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    session_info = {
        "inference_class": "nnInteractiveInferenceSession",
        "point_radius": 4,
        "preferred_scribble_thickness": [2, 2, 2],
        "interaction_decay": 0.98,
    }
    with contextlib.redirect_stdout(io.StringIO()):  # nnunetv2 prints about its unset paths on import
        from nnInteractive.trainer.nnInteractiveTrainer import nnInteractiveTrainer_stub

        plans_manager = PlansManager(plans)
        with torch.random.fork_rng(devices=[]):  # the seed stays local; the host's random state is untouched
            torch.manual_seed(seed)
            # 1 image channel + 7 interaction channels (prev_seg, box/lasso ±, point ±, scribble ±), 2 classes
            network = nnInteractiveTrainer_stub.build_network_architecture(
                plans_manager, plans_manager.get_configuration(configuration), 8, 2, enable_deep_supervision=False
            )
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / PLANS_FILE).write_text(json.dumps(plans, indent=1), encoding="utf-8")
    (folder / DATASET_FILE).write_text(json.dumps(dataset, indent=1), encoding="utf-8")
    (folder / SESSION_FILES[1]).write_text(json.dumps(session_info), encoding="utf-8")
    (folder / LICENSE_FILE).write_text("Random weights (MedFM test model)\nNo trained content.\n", encoding="utf-8")
    checkpoint = {
        "network_weights": network.state_dict(),
        "trainer_name": _TRAINER,
        "init_args": {"configuration": configuration, "fold": 0},
        "current_epoch": 0,
    }
    torch.save(checkpoint, folder / "fold_0" / CHECKPOINT_FILE)
    return folder
