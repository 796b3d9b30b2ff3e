"""SAM 2 / SAM 2.1 and MedSAM2 through Meta's `sam2` package, fed from arrays.

One model serves both uses:

* clicks on a slice, like SAM: ``encode`` runs the Hiera image encoder once
  per slice, ``decode`` runs the prompt encoder and mask decoder;
* propagation with memory: ``track`` runs SAM 2's video predictor through the
  slices of an axis, conditioned on every anchor mask. Its frames come straight
  from the volume (float images, never JPEG files on disk), and its image
  features come from the session's embedding cache, so a slice encoded for a
  click is not encoded again when tracking passes over it, and back.

The network is built from the configs shipped inside the `sam2` package (with
Hydra, as `sam2` itself does); the checkpoint is read with
``torch.load(weights_only=True)`` on the CPU and loaded strictly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import ModelError
from .base import Embedding, Prediction, Prompts2D
from .sam import TorchEngine, mismatched_weights, read_state_dict

# The normalisation the SAM 2 image encoder was trained with (ImageNet).
_PIXEL_MEAN = (0.485, 0.456, 0.406)
_PIXEL_STD = (0.229, 0.224, 0.225)


def config_for(arch: str) -> str:
    """The config shipped in the sam2 package for an architecture name such as ``sam2.1_hiera_t``."""
    family = "sam2.1" if arch.startswith("sam2.1") else "sam2"
    return f"configs/{family}/{arch}.yaml"


def build_sam2_model(arch: str, overrides: Sequence[str] = ()):
    """A SAM 2 video predictor (which is also a SAM 2 image model) with random weights, in eval mode."""
    import sam2  # noqa: F401  (importing sam2 registers its configs with Hydra)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    settings = [
        "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
        # The post-processing that sam2's own builder switches on for inference.
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        # Hole filling in sam2 needs its optional CUDA extension; MedFM's post-processing does it instead.
        "++model.fill_hole_area=0",
        *overrides,
    ]
    try:
        config = compose(config_name=config_for(arch), overrides=settings)
    except Exception as exc:  # hydra raises its own errors for unknown configs and bad overrides
        raise ModelError(f"SAM 2 architecture '{arch}' is not in the installed sam2 package ({exc}).") from None
    OmegaConf.resolve(config)
    return instantiate(config.model, _recursive_=True).eval()


def load_sam2_model(arch: str, checkpoint: str | Path, overrides: Sequence[str] = (), model_name: str = ""):
    """Build a SAM 2 model and load a checkpoint into it, checking keys and shapes strictly."""
    state_dict = read_state_dict(checkpoint)
    model = build_sam2_model(arch, overrides)
    missing, unexpected, wrong_shape = mismatched_weights(model, state_dict)
    if missing or unexpected or wrong_shape:
        looks_like = (
            "a SAM (1) checkpoint"
            if any(k.startswith("image_encoder.blocks.") for k in state_dict)
            else (
                "a SAM 2 checkpoint of another size"
                if any(k.startswith("image_encoder.trunk.") for k in state_dict)
                else "not a SAM 2 checkpoint"
            )
        )
        raise ModelError(
            f"'{Path(checkpoint).name}' does not match {model_name or arch} ({arch}): {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(wrong_shape)} wrong-shaped weights; it looks like {looks_like}. "
            "Choose the model that matches the file."
        )
    model.load_state_dict(state_dict, strict=True)
    return model


class _CachedFrameFeatures(dict):
    """Stands in for the video predictor's one-frame feature cache: every frame is served from the session's cache.

    The predictor looks frames up with ``get`` and replaces its cache on a
    miss; this one never misses, so features are computed once per slice,
    through the same cache that interactive clicks use.
    """

    def __init__(self, engine: Sam2Engine, frames) -> None:
        super().__init__()
        self.engine = engine
        self.frames = frames

    def get(self, frame_index, default=None):
        import torch

        embedding = self.frames.embedding(int(frame_index))
        placeholder = torch.zeros(1, 3, 1, 1, device=self.engine.device)  # the predictor never reads the image
        return placeholder, self.engine.backbone_out(embedding)


class Sam2Engine(TorchEngine):
    """SAM 2 / 2.1 or MedSAM2: clicks on one slice, and tracking through the volume with memory."""

    tracks_with_memory = True

    def __init__(
        self,
        model,
        model_name: str,
        device: str = "cpu",
        weights_id: str = "",
        prompt_types: tuple[str, ...] = ("point", "box", "mask"),
    ) -> None:
        super().__init__(model, model_name, device, weights_id, prompt_types)
        self._position_encodings = None  # (feature shapes, encodings)

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    # ---------------------------------------------------------------- encode
    def model_input(self, image: np.ndarray):
        """The image as the encoder takes it: squashed to the square input, as SAM 2's own transforms do
        (floats all the way), ImageNet mean and std; a (1, 3, S, S) tensor on the engine's device."""
        import torch
        import torch.nn.functional as F

        size = self.image_size
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(_PIXEL_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_PIXEL_STD).view(1, 3, 1, 1)
        return ((x.clamp(0.0, 1.0).expand(1, 3, size, size) - mean) / std).to(self.device)

    def encode(self, image: np.ndarray) -> Embedding:
        import torch

        if image.ndim != 2:
            raise ValueError(f"expected a 2D image, got shape {image.shape}")
        size = self.image_size
        with torch.inference_mode():
            x = self.model_input(image)
            with self.autocast():
                backbone_out = self.model.forward_image(x)
            features = [f.to(self.storage_dtype).contiguous() for f in backbone_out["backbone_fpn"]]
        return Embedding(
            features=features,
            image_shape=tuple(image.shape),
            nbytes=sum(f.numel() * f.element_size() for f in features),
            extra={"input_size": (size, size)},
        )

    def backbone_out(self, embedding: Embedding) -> dict:
        """The backbone output SAM 2's heads expect, from a cached embedding."""
        return self.backbone_out_of(embedding.features)

    def backbone_out_of(self, features) -> dict:
        """The backbone output SAM 2's heads expect, from the FPN levels (any precision)."""
        import torch

        features = [f.float() for f in features]
        shapes = tuple(tuple(f.shape[1:]) for f in features)
        if self._position_encodings is None or self._position_encodings[0] != shapes:
            # Sine encodings depend only on each map's size: computed once, not stored with every slice. Made as
            # ordinary tensors (not inference tensors, even when a click's decode asks first), so that
            # fine-tuning's backward pass may keep them too.
            with torch.inference_mode(False), torch.no_grad():
                encode = self.model.image_encoder.neck.position_encoding
                self._position_encodings = (shapes, [encode(torch.empty(1, *s)).to(f.device) for s, f in
                                                     zip(shapes, features)])  # fmt: skip
        encodings = [e.expand(f.shape[0], *e.shape[1:]) for e, f in zip(self._position_encodings[1], features)]
        return {"backbone_fpn": features, "vision_pos_enc": encodings}

    # ---------------------------------------------------------------- decode
    def decoder_forward(self, features, prompts: Prompts2D, image_shape, input_size=None, mask_input=None,
                        multimask: bool = False):  # fmt: skip
        """Prompt encoder and mask decoder on one image's features (the backbone's FPN levels):
        (low-res logits (1, M, h, w), IoU (1, M)). Gradients flow outside inference mode (fine-tuning)."""
        import torch

        model = self.model
        rows, cols = image_shape
        size = self.image_size
        _, vision_feats, _, feat_sizes = model._prepare_backbone_features(self.backbone_out_of(features))
        if model.directly_add_no_mem_embed:  # as in training on single images
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(1, -1, *s) for f, s in zip(vision_feats, feat_sizes)]
        image_embedding, high_res = maps[-1], maps[:-1]
        # Pixel coordinates to the model's square input (pixel centres kept aligned).
        scale = np.array([size / cols, size / rows], np.float32)
        coords = [(prompts.points + 0.5) * scale - 0.5]
        labels = [prompts.labels]
        if prompts.box is not None:
            coords.insert(0, (prompts.box.reshape(2, 2) + 0.5) * scale - 0.5)
            labels.insert(0, np.array([2, 3], np.int32))
        point_coords = torch.as_tensor(np.concatenate(coords), device=self.device)[None]
        point_labels = torch.as_tensor(np.concatenate(labels), dtype=torch.int, device=self.device)[None]
        sparse, dense = model.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=mask_input)
        low_res, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=image_embedding,
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=high_res,
        )
        return low_res.float().clamp(-32.0, 32.0), iou

    def image_mask(self, low_res, input_size, image_shape):
        """Low-res logits (N, 1, h, w) as a boolean mask on the encoded image's grid (N, 1, rows, cols)."""
        import torch.nn.functional as F

        return F.interpolate(low_res, tuple(image_shape), mode="bilinear", align_corners=False) > 0.0

    def low_res_target(self, mask: np.ndarray, input_size=None) -> np.ndarray:
        """A mask on the encoded image's grid, on the decoder's low-res grid (float in [0, 1]): a training target."""
        from .sam import _low_res_target

        size = int(self.model.sam_prompt_encoder.mask_input_size[0])
        return _low_res_target(mask, None, self.image_size, size, pad=False)

    def decode(self, embedding: Embedding, prompts: Prompts2D, previous_logits: np.ndarray | None = None) -> Prediction:
        import torch

        self.check_prompts(prompts)
        multimask = prompts.is_single_point and previous_logits is None
        with torch.inference_mode():
            mask_input = None
            if previous_logits is not None:
                mask_input = torch.as_tensor(previous_logits, dtype=torch.float32, device=self.device).reshape(
                    1, 1, *previous_logits.shape[-2:]
                )
            low_res, iou = self.decoder_forward(
                embedding.features, prompts, embedding.image_shape, None, mask_input, multimask
            )
            best = int(torch.argmax(iou[0])) if multimask else 0
            chosen = low_res[:, best : best + 1]
            mask = self.image_mask(chosen, None, embedding.image_shape)[0, 0]
            logits = chosen[0].cpu().numpy()
            return Prediction(mask=mask.cpu().numpy(), score=float(iou[0, best]), low_res_logits=logits)

    # ----------------------------------------------------------------- track
    def _new_tracking_state(self, frames) -> dict:
        """The video predictor's state, as its ``init_state`` builds it, but over our frames."""
        import torch

        device = torch.device(self.device)
        height, width = frames.image_shape
        return {
            "images": None,  # never read: every frame's features come from the cache below
            "num_frames": len(frames),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": height,
            "video_width": width,
            "device": device,
            "storage_device": device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": _CachedFrameFeatures(self, frames),
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }

    def track(
        self, frames, conditioning: dict[int, np.ndarray], start: int, step: int, limit: int
    ) -> Iterator[tuple[int, Prediction]]:
        """Track one object from ``start`` towards ``limit`` (inclusive), one slice at a time.

        ``conditioning`` maps slice indices to the masks there (anchors), which
        SAM 2 keeps in its memory as conditioning frames. Each yielded
        prediction's mask is on the frame's image grid; its score is SAM 2's
        object-presence probability.
        """
        import torch

        predictor = self.model
        state = self._new_tracking_state(frames)
        with torch.inference_mode(), self.autocast():
            for index, mask in sorted(conditioning.items()):
                predictor.add_new_mask(
                    state, frame_idx=int(index), obj_id=1, mask=torch.as_tensor(mask, dtype=torch.bool)
                )
            predictor.propagate_in_video_preflight(state)
        outputs = state["output_dict_per_obj"][0]
        for index in range(start + step, limit + step, step):
            if index in outputs["cond_frame_outputs"]:
                return
            with torch.inference_mode(), self.autocast():
                current, low_res = predictor._run_single_frame_inference(
                    inference_state=state,
                    output_dict=outputs,
                    frame_idx=index,
                    batch_size=1,
                    is_init_cond_frame=False,
                    point_inputs=None,
                    mask_inputs=None,
                    reverse=step < 0,
                    run_mem_encoder=True,
                )
                outputs["non_cond_frame_outputs"][index] = current
                state["frames_tracked_per_obj"][0][index] = {"reverse": step < 0}
                _, video_logits = predictor._get_orig_video_res_output(state, low_res)
                presence = torch.sigmoid(current["object_score_logits"].float()).item()
                prediction = Prediction(
                    mask=(video_logits[0, 0] > 0.0).cpu().numpy(),
                    score=float(presence),
                    low_res_logits=low_res[0].float().cpu().numpy(),
                )
            yield index, prediction
