"""VISTA3D (MONAI's 3D CT foundation model) behind MedFM's volume-engine interface.

The network is MONAI's own ``vista3d132``; the weights are the bundle's
``models/model.pt`` (a plain state dict), read with ``weights_only=True`` and
checked strictly. Clicks go through MONAI's ``point_based_window_inferer`` and
class prompts through a sliding window, as in the bundle.

Geometry. The bundle's preprocessing runs with MONAI's transforms on a
MetaTensor that carries the volume's IJK→RAS matrix: 1.5 mm spacing
(bilinear), a crop to the CT's foreground (HU > 0, margin 10), the intensity
window to [0, 1] and RAS orientation. Our arrays are (K, J, I) and MONAI's are
(I, J, K): the array goes in transposed. Afterwards the model grid's affine
(model voxel → RAS) is all that is needed: ``inv(model affine) @ IJK→RAS`` maps
a click into the model grid, and the same matrix, inverted, samples results
back onto the original grid (logits linearly, then thresholded at 0; class
label maps by nearest neighbour, as the bundle's ``Invertd``). Oblique, LPS
and anisotropic matrices need nothing special.

The crop. The bundle crops to the bounding box of HU > 0 plus 10 voxels
(15 mm), so on a CT it drops only air around the body. A positive click there
raises a PromptError (it cannot be on an organ); a negative click there is
answered with a note and no change, because everything outside the crop is
background anyway. A volume without any voxel above 0 (not a CT in HU) is not
cropped at all.

State of an object. The model's logits for the current object are kept on the
model grid (``prev_mask``) and passed to every click, so that windows the click
does not touch keep their earlier answer instead of NaN (MONAI's inferer leaves
NaN there without one), and so that MONAI's ``connected_components_combine``
merges the click's answer into it as in the bundle's evaluation. Only the
click's window is computed (``point_start``); the image features of the last
window are cached, so a second click in the same window skips the encoder.

Class prompts. A class is segmented by MONAI's sliding window at overlap 0.3
(the bundle's setting). Groups (kidney, lung, bone) expand to their parts as the
bundle's ``subclass`` does. Clicks on a class object go to the point head with
the class as ``prompt_class`` and the class logits as ``prev_mask``; the
bundle's evaluator passes ``class_vector`` again instead, which reruns the class
head in the click's window and so cannot reuse the cached features. Both merge
the click through the same ``connected_components_combine``.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError, PromptError
from ..imaging.volume import Volume
from .volumetric import BOX, CLASS, MASK, POINT, Interaction, VolumeEngine, VolumePrediction

LABELS_PATH = Path(__file__).with_name("vista3d_labels.json")
#: classes whose clicks the model takes as 3 (positive) and 2 (negative), as in training
#: (monai/apps/vista3d/sampler.py); MONAI's ``VistaPreTransformd`` defaults to another list, so ours is explicit
SPECIAL_CLASSES = (23, 24, 25, 26, 27, 57, 128)
SPACING_MM = 1.5
#: the bundle's intensity window (HU), scaled to [0, 1] and clipped
INTENSITY_RANGE = (-963.8247715525971, 1053.678477684517)
CROP_MARGIN = 10
ROI_SIZE = 128
OVERLAP = 0.3
#: the logit of "background, not computed": MONAI's own fill value in ``connected_components_combine``
BACKGROUND_LOGIT = -1.0
#: the stitched class logits of one sliding-window pass may take this much memory; more classes take several passes
CLASS_PASS_BYTES = 2 << 30
BOX_NOTE = "VISTA3D takes no boxes: the box was given as a click at its centre."
_CHUNK_VOXELS = 1 << 22
_DOWNLOAD = "download it again with `medfm models download vista3d`"


def build_vista3d_network(embed_dim: int = 48) -> torch.nn.Module:
    """VISTA3D with fresh (random) weights, in eval mode; 48 is the published model's width."""
    from monai.networks.nets import vista3d132

    return vista3d132(encoder_embed_dim=int(embed_dim), in_channels=1).eval()


def save_random_vista3d(path: str | Path, embed_dim: int = 8, seed: int = 0) -> Path:
    """Write a random-weight checkpoint in the official format (a plain state dict), for tests and benchmarks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(build_vista3d_network(embed_dim).state_dict(), path)
    return path


def _checkpoint_width(state_dict: dict) -> int | None:
    weight = state_dict.get("image_encoder.encoder.conv_init.weight")
    return int(weight.shape[0]) if torch.is_tensor(weight) and weight.ndim == 5 else None


def load_vista3d_network(path: str | Path, embed_dim: int = 48) -> torch.nn.Module:
    """VISTA3D with the weights of ``path`` (the bundle's models/model.pt), checked key by key and shape by shape."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"VISTA3D checkpoint '{path}' does not exist; {_DOWNLOAD}.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on junk input
        if isinstance(exc, MemoryError):
            raise
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"'{path.name}' is not a VISTA3D checkpoint ({reason}); {_DOWNLOAD}.") from None
    # The bundle's file is a bare state dict; training scripts wrap it.
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if isinstance(loaded, dict) and loaded and all(str(k).startswith("module.") for k in loaded):
        loaded = {k[len("module.") :]: v for k, v in loaded.items()}  # saved from DistributedDataParallel
    if (
        not isinstance(loaded, dict)
        or not loaded
        or not all(torch.is_tensor(v) for v in loaded.values())
        or not any(str(k).startswith(("image_encoder.", "point_head.", "class_head.")) for k in loaded)
    ):
        raise ModelError(f"'{path.name}' is not a VISTA3D checkpoint (no VISTA3D weights in it); {_DOWNLOAD}.")
    # Built without memory (meta tensors) and then given the file's tensors: one copy of 872 MB, not two.
    with torch.device("meta"):
        network = build_vista3d_network(embed_dim)
    expected = network.state_dict()
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    mismatched = [k for k in expected if k in loaded and tuple(loaded[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        width = _checkpoint_width(loaded)
        hint = f" (it looks like width {width})" if width is not None and width != embed_dim else ""
        raise ModelError(
            f"'{path.name}' does not fit VISTA3D of width {embed_dim}: {len(missing)} missing, {len(unexpected)} "
            f"unexpected and {len(mismatched)} mismatched weights{hint}; {_DOWNLOAD}."
        )
    # A half-precision copy would otherwise stay half precision (assign keeps the file's dtype).
    loaded = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in loaded.items()}
    network.load_state_dict(loaded, strict=True, assign=True)
    return network.eval()


@lru_cache(maxsize=1)
def label_table() -> dict:
    """The class table (vista3d_labels.json): labels with names and colours, 'everything' and the groups."""
    return json.loads(LABELS_PATH.read_text(encoding="utf-8"))


def _normalise(name: str) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


class _WindowCache:
    """The network as the inferers call it, keeping the point branch's features of the last window.

    The network's own ``keep_cache`` reuses its cached features whatever window it is given; this wrapper
    clears them whenever the window changes, so a reuse is always of the same voxels. It also records the
    windows (for the region a click changed) and counts calls (for progress).
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network
        self.window: tuple | None = None
        self.windows: list[tuple[tuple[int, int], ...]] = []
        self.on_call: Callable[[], None] | None = None

    def forget(self) -> None:
        self.window = None
        self.network.image_embeddings = None

    def __call__(self, image: torch.Tensor, patch_coords=None, class_vector=None, **kwargs) -> torch.Tensor:
        window = tuple((int(s.start), int(s.stop)) for s in patch_coords[0][-3:])
        self.windows.append(window)
        if self.on_call is not None:
            self.on_call()
        if class_vector is not None:  # the class head needs the encoder's other branch: nothing to reuse
            return self.network(image, patch_coords=patch_coords, class_vector=class_vector, **kwargs)
        if window != self.window:
            self.forget()
        logits = self.network(image, patch_coords=patch_coords, keep_cache=True, **kwargs)
        self.window = window
        return logits


class Vista3DEngine(VolumeEngine):
    """VISTA3D: clicks, class prompts ("liver") and initial masks on a CT volume; boxes become a click."""

    interactions = (POINT, BOX, CLASS, MASK)

    def __init__(
        self,
        network: torch.nn.Module,
        device: str = "cpu",
        model_name: str = "vista3d",
        roi_size: int = ROI_SIZE,
        overlap: float = OVERLAP,
    ) -> None:
        from monai.utils import optional_import

        # MONAI imports these optionally but fails without them: scikit-image in connected_components_combine
        # (which merges every click into the object), nibabel in Orientation.
        needed = (("skimage.measure", "scikit-image"), ("nibabel", "nibabel"))
        missing = [package for module, package in needed if not optional_import(module)[1]]
        if missing:
            raise ModelError(f"VISTA3D needs {' and '.join(missing)}; install with: pip install {' '.join(missing)}")
        self.device = str(device)
        self.model_name = model_name
        self.network = network.to(self.device).eval()
        self.roi_size = (int(roi_size),) * 3
        self.overlap = float(overlap)
        table = label_table()
        self._names = {int(label["id"]): label["name"] for label in table["labels"]}
        self.classes = {_normalise(name): i for i, name in self._names.items()}
        self.class_colors = {_normalise(lb["name"]): tuple(lb["color"]) for lb in table["labels"]}
        self.everything = [int(i) for i in table["everything"]]
        self.groups = {_normalise(name): [int(i) for i in ids] for name, ids in table["groups"].items()}
        #: what the engine says about the last interaction (a box given as a click, say); None when nothing
        self.last_note: str | None = None
        self._cache = _WindowCache(self.network)
        self._shape: tuple[int, int, int] | None = None
        self._image: torch.Tensor | None = None
        self._model_affine: np.ndarray | None = None
        #: (k, j, i, 1) of the volume's array → (x, y, z, 1) of the model grid
        self._model_from_kji: np.ndarray | None = None
        self._reset_object()

    # ------------------------------------------------------------- geometry
    def set_volume(self, volume: Volume) -> None:
        """Preprocess the volume as the bundle does (MONAI transforms on a MetaTensor with its affine)."""
        from monai.data import MetaTensor
        from monai.transforms import CropForeground, Orientation, ScaleIntensityRange, Spacing

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's deprecation chatter; from_numpy on a read-only array
            array = torch.from_numpy(np.asarray(volume.array, dtype=np.float32))
            # MONAI's spatial axes are (I, J, K): a transposed view, so no copy before resampling.
            affine = torch.as_tensor(volume.ijk_to_ras, dtype=torch.float64)
            image = MetaTensor(array.permute(2, 1, 0)[None], affine=affine)
            image = Spacing(pixdim=(SPACING_MM,) * 3, mode="bilinear")(image)
            if bool((image > 0).any()):  # a volume without HU > 0 would crop to nothing: keep it whole
                image = CropForeground(margin=CROP_MARGIN, allow_smaller=True)(image)
            a_min, a_max = INTENSITY_RANGE
            image = ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)(image)
            image = Orientation(axcodes="RAS", labels=None)(image)
        self._model_affine = np.asarray(image.affine, dtype=np.float64)
        kji_to_ijk = np.eye(4)[[2, 1, 0, 3]]
        self._model_from_kji = np.linalg.inv(self._model_affine) @ volume.ijk_to_ras @ kji_to_ijk
        self._image = image.as_tensor().to(torch.float32)[None].contiguous().to(self.device)
        self._shape = tuple(int(n) for n in volume.array.shape)
        self._cache.forget()
        self._reset_object()

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """The model grid's size (x, y, z) after resampling, cropping and reorientation."""
        self._require_volume()
        return tuple(int(n) for n in self._image.shape[-3:])

    @property
    def model_affine(self) -> np.ndarray:
        """Model voxel (x, y, z) → RAS millimetres."""
        self._require_volume()
        return self._model_affine.copy()

    def to_model_grid(self, points_kji: np.ndarray) -> np.ndarray:
        """Continuous voxel coordinates (N, 3) of the volume's (k, j, i) array → (x, y, z) of the model grid."""
        self._require_volume()
        return _apply(self._model_from_kji, points_kji)

    def from_model_grid(self, points_xyz: np.ndarray) -> np.ndarray:
        """Model grid (x, y, z) → continuous (k, j, i) voxel coordinates of the volume's array."""
        self._require_volume()
        return _apply(np.linalg.inv(self._model_from_kji), points_xyz)

    # --------------------------------------------------------------- objects
    def _reset_object(self) -> None:
        self._points: list[np.ndarray] = []
        self._labels: list[int] = []
        #: the class the object came from, for its clicks' labels (None: clicks only, or a group)
        self._class_id: int | None = None
        #: the object's logits on the model grid, [1, 1, x, y, z] on the CPU (None: all background)
        self._prev: torch.Tensor | None = None
        #: the object's mask on the volume's grid (None: empty); windows a click misses keep it exactly
        self._mask: np.ndarray | None = None

    def start_object(self, initial_mask: np.ndarray | None = None) -> VolumePrediction | None:
        """Forget the clicks; an initial mask becomes the logits later clicks refine (VISTA3D does not redo it)."""
        self._require_volume()
        self._reset_object()
        self.last_note = None
        if initial_mask is not None:
            mask = np.asarray(initial_mask, dtype=bool)
            if mask.shape != self._shape:
                raise PromptError(f"The initial mask has shape {mask.shape}, not the volume's {self._shape}.")
            if mask.any():
                self._mask = mask.copy()
                self._prev = self._mask_to_model(mask)
        return None

    def check(self, interaction: Interaction, shape: tuple[int, int, int]) -> None:
        if interaction.kind == CLASS:
            key = self.resolve_class(interaction.class_name)
            if key == "everything":
                raise PromptError("'everything' is many classes, not one object; segment it with the class list.")
        super().check(interaction, shape)

    def resolve_class(self, name: str) -> str:
        """The table's key of a class, group or 'everything'; a PromptError naming close names when unknown."""
        key = _normalise(name)
        if key in self.classes or key == "everything":
            return key
        close = difflib.get_close_matches(key, [*self.classes, "everything"], n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise PromptError(
            f"{self.model_name} has no class '{name}'; {hint}See `medfm models info {self.model_name}` for its classes."
        )

    def class_ids(self, name: str) -> list[int]:
        """The labels a class name stands for: 'everything' → 117, a group (kidney) → its parts, else one."""
        key = self.resolve_class(name)
        if key == "everything":
            return list(self.everything)
        return list(self.groups.get(key, [self.classes[key]]))

    # ---------------------------------------------------------- interactions
    def interact(self, interaction: Interaction) -> VolumePrediction:
        self._require_volume()
        self.check(interaction, self._shape)
        self.last_note = None
        if interaction.kind == MASK:
            self.start_object(interaction.mask)
            return _cropped(self._mask)
        if interaction.kind == CLASS:
            return self._segment_class(interaction.class_name)
        point = interaction.points[0]
        if interaction.kind == BOX:
            # A box's centre is inside the object; its corners often are too in 3D, so they are not used as
            # negative clicks.
            point = interaction.points.mean(axis=0)
        prediction = self._click(point, interaction.positive)
        if interaction.kind == BOX:
            self.last_note = BOX_NOTE if self.last_note is None else f"{BOX_NOTE} {self.last_note}"
        return prediction

    def _click(self, point_kji: np.ndarray, positive: bool) -> VolumePrediction:
        xyz = self.to_model_grid(np.asarray(point_kji, dtype=np.float64)[None])[0]
        size = np.asarray(self.model_shape, dtype=np.float64)
        if np.any(xyz < -0.5) or np.any(xyz > size - 0.5):
            if positive:
                raise PromptError(
                    "The click lies outside the body, the part of the CT VISTA3D looks at (above 0 HU and 15 mm "
                    "around it); click on the body."
                )
            self.last_note = "The negative click lies outside the body, which is background anyway; nothing changed."
            return VolumePrediction(np.zeros((0, 0, 0), dtype=bool))
        self._points.append(np.clip(xyz, 0, size - 1))
        self._labels.append(1 if positive else 0)
        try:
            logits, windows = self._run_points(point_start=len(self._points) - 1)
        except BaseException:
            self._points.pop(), self._labels.pop()
            raise
        self._prev = logits
        return self._update_region(logits, windows)

    def _run_points(self, point_start: int) -> tuple[torch.Tensor, list]:
        from monai.apps.vista3d.inferer import point_based_window_inferer

        coords = torch.as_tensor(np.stack(self._points)[None], dtype=torch.float32, device=self.device)
        labels = torch.as_tensor([self._labels], dtype=torch.long, device=self.device)
        prompt_class = None
        if self._class_id is not None:
            # Clicks on a class object tell the point head the class; tumours and vessels take 3/2, not 1/0.
            prompt_class = torch.as_tensor([[self._class_id]], device=self.device)
            if self._class_id in SPECIAL_CLASSES:
                labels = labels + 2
        prev = self._prev if self._prev is not None else torch.full((1, 1, *self.model_shape), BACKGROUND_LOGIT)
        self._cache.windows = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits = point_based_window_inferer(
                inputs=self._image,
                roi_size=self.roi_size,
                predictor=self._cache,
                point_coords=coords,
                point_labels=labels,
                class_vector=None,
                prompt_class=prompt_class,
                prev_mask=prev,
                point_start=point_start,
                transpose=True,
            )
        logits = _plain_logits(logits)
        # The inferer pads an image smaller than the window evenly on both sides; its windows are in padded voxels.
        pads = [max(r - n, 0) // 2 for r, n in zip(self.roi_size, self.model_shape)]
        windows = [
            tuple((max(lo - p, 0), min(hi - p, n)) for (lo, hi), p, n in zip(w, pads, self.model_shape))
            for w in self._cache.windows
        ]
        return logits, windows

    def _update_region(self, logits: torch.Tensor, windows: list) -> VolumePrediction:
        """Sample the computed windows back onto the volume; voxels outside them keep the object's mask."""
        # The region: the box around the windows' eight corners (voxel faces), mapped onto the volume's grid.
        corners = []
        for window in windows:
            lo = np.array([w[0] for w in window], dtype=np.float64) - 0.5
            hi = np.array([w[1] for w in window], dtype=np.float64) - 0.5
            corners.append(np.array([[(lo, hi)[b >> a & 1][a] for a in range(3)] for b in range(8)]))
        kji = self.from_model_grid(np.concatenate(corners))
        start = np.clip(np.floor(kji.min(axis=0)).astype(int), 0, self._shape)
        stop = np.clip(np.ceil(kji.max(axis=0)).astype(int) + 1, 0, self._shape)
        region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        values, coords = _resample(logits, self._model_from_kji, region, "bilinear", BACKGROUND_LOGIT, True)
        inside = np.zeros(values.shape, dtype=bool)
        for window in windows:
            inside_window = np.ones(values.shape, dtype=bool)
            for axis, (lo, hi) in enumerate(window):
                inside_window &= (coords[..., axis] >= lo - 0.5) & (coords[..., axis] <= hi - 0.5)
            inside |= inside_window
        if self._mask is None:
            self._mask = np.zeros(self._shape, dtype=bool)
        mask = np.where(inside, values > 0, self._mask[region])
        self._mask[region] = mask
        return VolumePrediction(mask, tuple(int(s.start) for s in region))

    def _segment_class(self, name: str) -> VolumePrediction:
        ids = self.class_ids(name)
        logits = self._class_logits(ids)
        # A group (kidney) is one object: its parts' union, i.e. the largest of their logits.
        self._reset_object()
        self._prev = logits.amax(dim=1, keepdim=True)
        self._class_id = ids[0] if len(ids) == 1 else None
        values, _ = _resample(self._prev, self._model_from_kji, _whole(self._shape), "bilinear", BACKGROUND_LOGIT)
        self._mask = values > 0
        return _cropped(self._mask)

    def _class_logits(self, ids: list[int], on_window: Callable[[], None] | None = None) -> torch.Tensor:
        """Class-head logits [1, C, x, y, z] on the model grid, by a sliding window as in the bundle."""
        from monai.inferers import SlidingWindowInfererAdapt

        inferer = SlidingWindowInfererAdapt(
            roi_size=self.roi_size, sw_batch_size=1, overlap=self.overlap, with_coord=True, padding_mode="replicate"
        )
        class_vector = torch.as_tensor(ids, device=self.device).unsqueeze(-1)
        self._cache.on_call, self._cache.windows = on_window, []
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logits = inferer(self._image, self._cache, class_vector=class_vector, transpose=True)
        finally:
            self._cache.on_call = None
        return _plain_logits(logits)

    def segment_classes(self, names: list[str], progress=None) -> dict[str, np.ndarray]:
        """(K, J, I) masks, one per class: groups and 'everything' give one per part, named as in the table.

        The classes compete as in the bundle (each voxel goes to the class with the largest positive logit).
        Many classes on a large volume take several sliding-window passes so that the stitched logits stay
        within ``CLASS_PASS_BYTES``; ``progress(done, total)`` counts windows.
        """
        self._require_volume()
        ids = list(dict.fromkeys(i for name in names for i in self.class_ids(name)))
        if not ids:
            raise PromptError("Name at least one class to segment, e.g. liver.")
        voxels = int(np.prod(self.model_shape))
        per_pass = max(1, int(CLASS_PASS_BYTES // (voxels * 5)))  # float32 logits and some to spare
        passes = [ids[n : n + per_pass] for n in range(0, len(ids), per_pass)]
        total = len(passes) * _window_count(self.model_shape, self.roi_size, self.overlap)
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(min(done[0], total), total)

        best = torch.full(self.model_shape, 0.0)
        labels = torch.zeros(self.model_shape, dtype=torch.int32)
        for chunk in passes:
            logits = self._class_logits(chunk, tick)[0]
            top, index = logits.max(dim=0)
            better = top > best  # best starts at 0: only positive logits win a voxel
            best = torch.where(better, top, best)
            labels = torch.where(better, torch.as_tensor(chunk, dtype=torch.int32)[index], labels)
        if progress is not None and done[0] < total:
            progress(total, total)
        values, _ = _resample(labels[None, None].float(), self._model_from_kji, _whole(self._shape), "nearest", 0.0)
        values = np.rint(values).astype(np.int32)
        return {self._names[i]: values == i for i in ids}

    # ------------------------------------------------------------- internals
    def _mask_to_model(self, mask: np.ndarray) -> torch.Tensor:
        """A (K, J, I) mask as logits on the model grid: +1 inside, -1 outside, linear in between."""
        source = torch.from_numpy(mask.astype(np.float32))[None, None]
        fraction, _ = _resample(source, np.linalg.inv(self._model_from_kji), _whole(self.model_shape), "bilinear", 0.0)
        return torch.from_numpy(fraction * 2.0 - 1.0)[None, None]

    def _require_volume(self) -> None:
        if self._image is None:
            raise PromptError("No volume is set; load a volume before segmenting.")

    def close(self) -> None:
        self._cache.forget()
        self._image = self._prev = self._mask = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _plain_logits(logits: torch.Tensor) -> torch.Tensor:
    """Float32 CPU logits without MONAI's metadata (it would be deep-copied with every click); NaN as background."""
    logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
    return logits.float().cpu().nan_to_num_(nan=BACKGROUND_LOGIT)  # in place: 117 classes' logits are large


def _whole(shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    return tuple(slice(0, int(n)) for n in shape)


def _cropped(mask: np.ndarray | None) -> VolumePrediction:
    """A whole-volume mask as the smallest region holding it (a 1-voxel empty one when there is none)."""
    if mask is None or not mask.any():
        return VolumePrediction(np.zeros((1, 1, 1), dtype=bool))
    bounds = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    region = tuple(slice(int(b[0]), int(b[-1]) + 1) for b in bounds)
    return VolumePrediction(np.ascontiguousarray(mask[region]), tuple(int(b[0]) for b in bounds))


def _window_count(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """How many windows MONAI's sliding window takes over ``shape`` (its scan interval, after padding to roi)."""
    count = 1
    for n, r in zip(shape, roi):
        n = max(n, r)
        interval = max(int(r * (1 - overlap)), 1) if r < n else r
        count *= 1 + int(np.ceil(max(n - r, 0) / interval))
    return count


def _resample(
    source: torch.Tensor,
    source_from_dest: np.ndarray,
    region: tuple[slice, slice, slice],
    mode: str,
    outside: float,
    with_coords: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sample ``source`` [1, 1, a, b, c] at the voxels of ``region`` of another grid.

    ``source_from_dest`` maps the other grid's voxel indices to the source's (both in their own axis order,
    voxel centres at integers). Points more than half a voxel outside the source get ``outside``. Works in
    slabs so that a 512×512×300 volume never needs a full-size coordinate grid. Returns the values and, when
    asked, the source coordinates of every voxel.
    """
    import torch.nn.functional as F

    size = np.asarray(source.shape[-3:], dtype=np.float64)
    shape = tuple(s.stop - s.start for s in region)
    values = np.empty(shape, dtype=np.float32)
    coords = np.empty((*shape, 3), dtype=np.float32) if with_coords else None
    matrix = torch.as_tensor(source_from_dest, dtype=torch.float64)
    axes = [torch.arange(s.start, s.stop, dtype=torch.float64) for s in region]
    step = max(1, _CHUNK_VOXELS // max(1, shape[1] * shape[2]))
    scale = torch.as_tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in size], dtype=torch.float64)
    for first in range(0, shape[0], step):
        d0 = axes[0][first : first + step]
        points = (
            matrix[:3, 3]
            + d0[:, None, None, None] * matrix[:3, 0]
            + axes[1][None, :, None, None] * matrix[:3, 1]
            + axes[2][None, None, :, None] * matrix[:3, 2]
        )
        inside = ((points >= -0.5) & (points <= torch.as_tensor(size) - 0.5)).all(dim=-1)
        # grid_sample's last grid axis indexes the source's last spatial axis first.
        grid = ((points * scale - (scale > 0).double()).flip(-1)).float()[None]
        sampled = F.grid_sample(source.float(), grid, mode=mode, padding_mode="border", align_corners=True)[0, 0]
        values[first : first + len(d0)] = torch.where(inside, sampled, torch.tensor(outside)).numpy()
        if coords is not None:
            coords[first : first + len(d0)] = points.float().numpy()
    return values, coords
