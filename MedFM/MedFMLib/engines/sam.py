"""SAM ViT-B/L/H and MedSAM through Meta's `segment-anything` package.

The models are built from segment-anything's own classes and loaded from the
official checkpoint files ourselves, rather than through its ``build_sam``,
because that calls ``torch.load`` without ``map_location`` (a GPU-saved file
fails on a CPU machine) and without ``weights_only`` (a checkpoint could run
code). Keys and shapes are checked strictly, with a message that names the
likely right model when a file does not match.

Images arrive as float32 in [0, 1] and stay floating point all the way into
the encoder; they are never quantised to 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError, PromptError
from .base import Embedding, Engine, Prediction, Prompts2D


@dataclass(frozen=True)
class SamArchitecture:
    """Hyper-parameters of a SAM model, as in segment-anything's ``build_sam``."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    prompt_embed_dim: int = 256
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TinyVitArchitecture:
    """Hyper-parameters of a TinyViT image encoder for SAM."""

    image_size: int
    #: the patch embedding's kernel: 3 (stride 2, twice: 1024 -> 256) or 1 (stride 1: 256 -> 256)
    patch_kernel: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    @property
    def grid(self) -> int:
        """The token grid after the patch embedding."""
        return self.image_size // 4 if self.patch_kernel == 3 else self.image_size

    @property
    def embedding_size(self) -> int:
        """The encoder's output grid: a quarter of the token grid (stages 2 and 3 run on it)."""
        return self.grid // 4


SAM_ARCHITECTURES: dict[str, SamArchitecture | TinyVitArchitecture] = {
    "vit_b": SamArchitecture(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArchitecture(1280, 32, 16, (7, 15, 23, 31)),
    # TinyViT-5M encoders: MobileSAM at 1024 (3x3 stride-2 patch embedding), LiteMedSAM at 256 (1x1 stride 1).
    "tiny_vit_1024": TinyVitArchitecture(image_size=1024, patch_kernel=3),
    "tiny_vit_256": TinyVitArchitecture(image_size=256, patch_kernel=1),
}


def register_architecture(name: str, architecture: SamArchitecture) -> None:
    """Make a SAM architecture (e.g. a small fine-tune) available by name."""
    SAM_ARCHITECTURES[name] = architecture


def get_architecture(name: str) -> SamArchitecture:
    try:
        return SAM_ARCHITECTURES[name]
    except KeyError:
        raise ModelError(f"Unknown SAM architecture '{name}': known are {', '.join(SAM_ARCHITECTURES)}.") from None


def build_sam_model(architecture: SamArchitecture | TinyVitArchitecture):
    """A SAM model with freshly initialised (random) weights, in eval mode."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    arch = architecture
    if isinstance(arch, TinyVitArchitecture):
        from .tinyvit import TinyViT

        image_encoder = TinyViT(arch)
    else:
        image_encoder = ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        )
    embedding_size = arch.embedding_size
    model = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return model.eval()


def read_state_dict(path: str | Path) -> dict:
    """Read a checkpoint's tensors safely (no code execution), onto the CPU."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Checkpoint '{path}' does not exist; check the path or download the model again.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises a dozen different types on junk input
        if isinstance(exc, MemoryError):
            raise
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"'{path.name}' is not a readable PyTorch checkpoint ({reason}); it may be truncated or the "
            "wrong file: download it again."
        ) from None
    # Fine-tuning scripts often wrap the weights; the official files are a bare state dict.
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not loaded or not all(torch.is_tensor(v) for v in loaded.values()):
        raise ModelError(f"'{path.name}' holds no model weights (expected a state dict of tensors).")
    return loaded


def _guess_architecture(state_dict: dict) -> str:
    if any(key.startswith("image_encoder.trunk.") for key in state_dict):
        return "a SAM 2 checkpoint"
    patch = state_dict.get("image_encoder.patch_embed.seq.0.c.weight")
    if patch is not None:
        which = "MobileSAM's, 1024 input" if patch.shape[-1] == 3 else "LiteMedSAM's, 256 input"
        return f"a TinyViT checkpoint ({which})"
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        return "not a SAM checkpoint"
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, arch in SAM_ARCHITECTURES.items():
        if not isinstance(arch, SamArchitecture):
            continue
        if arch.encoder_embed_dim == weight.shape[0] and arch.encoder_depth == depth:
            return f"a SAM {name} checkpoint"
    return f"a SAM checkpoint with embedding width {weight.shape[0]}"


def mismatched_weights(model, state_dict: dict) -> tuple[list[str], list[str], list[str]]:
    """Keys of a checkpoint that do not fit a model: (missing, unexpected, wrong shape)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, wrong_shape


def load_sam_model(architecture_name: str, checkpoint: str | Path, model_name: str = ""):
    """Build a SAM model and load a checkpoint into it, checking keys and shapes strictly."""
    architecture = get_architecture(architecture_name)
    state_dict = read_state_dict(checkpoint)
    model = build_sam_model(architecture)
    missing, unexpected, wrong_shape = mismatched_weights(model, state_dict)
    if missing or unexpected or wrong_shape:
        raise ModelError(
            f"'{Path(checkpoint).name}' does not match {model_name or architecture_name} "
            f"(SAM {architecture_name}): {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(wrong_shape)} wrong-shaped weights; it looks like {_guess_architecture(state_dict)}. "
            "Choose the model that matches the file."
        )
    model.load_state_dict(state_dict, strict=True)
    return model


class TorchEngine(Engine):
    """What SAM and SAM 2 engines share: the model on its device, and the precision used there."""

    def __init__(self, model, model_name: str, device: str, weights_id: str, prompt_types: tuple[str, ...]) -> None:
        import torch

        self.model_name = model_name
        self.device = device
        self.weights_id = weights_id
        self.prompt_types = prompt_types
        self.model = model.to(device).eval()
        # Half precision is safe for the image encoder on a GPU (autocast keeps the
        # numerically sensitive ops in float32); the small decoder stays float32.
        self.autocast_dtype = None
        if device.startswith("cuda"):
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.storage_dtype = torch.float16 if device != "cpu" else torch.float32

    @property
    def cache_id(self) -> str:
        precision = "fp16" if self.autocast_dtype is not None else "fp32"
        return f"{self.model_name}:{self.weights_id}@{self.device}/{precision}"

    def autocast(self):
        """The encoder's half-precision context on a GPU; nothing elsewhere."""
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)


PREPROCESSING = ("sam", "medsam", "litemedsam")


class SamEngine(TorchEngine):
    """A SAM-family model; ``preprocessing`` is how its images were prepared in training:

    - "sam" (SAM ViT-B/L/H, MobileSAM): longest side resized to the input, pixel mean and std of 0-255
      images, zero padding to a square;
    - "medsam": a plain resize to the square input, values in [0, 1];
    - "litemedsam": longest side resized to the input, the slice stretched to [0, 1] by its own minimum
      and maximum, zero padding to a square.
    """

    def __init__(
        self,
        model,
        model_name: str,
        device: str = "cpu",
        preprocessing: str = "sam",
        weights_id: str = "",
        prompt_types: tuple[str, ...] = ("point", "box"),
    ) -> None:
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"unknown preprocessing {preprocessing!r}")
        super().__init__(model, model_name, device, weights_id, prompt_types)
        self.preprocessing = preprocessing
        #: what runs the image encoder: the torch module, or its OpenVINO conversion (``use_openvino``)
        self.runtime, self.encoder = "torch", self.model.image_encoder
        self._prepared = None  # the decoder's prompt-independent work on the last embedding (sam_decoder.py)

    def use_openvino(self, cache_dir: Path, fast: bool = False, notify=None) -> None:
        """Run the image encoder through OpenVINO on the CPU (converted once, kept in ``cache_dir``)."""
        from .runtime import OpenVinoEncoder

        self.encoder = OpenVinoEncoder(
            self.model.image_encoder, self.image_size, cache_dir, f"{self.model_name}:{self.weights_id}", fast, notify
        )
        self.runtime = f"openvino-{self.encoder.precision}"

    @property
    def cache_id(self) -> str:
        # Another runtime or precision rounds differently: its embeddings are cached apart.
        return super().cache_id if self.runtime == "torch" else f"{super().cache_id}/{self.runtime}"

    @property
    def image_size(self) -> int:
        return int(self.model.image_encoder.img_size)

    def check_prompts(self, prompts: Prompts2D) -> None:
        super().check_prompts(prompts)
        if self.prompt_types == ("box",) and prompts.box is None:
            raise PromptError(f"{self.model_name} is box-prompted: draw a box around the object first.")

    def model_input(self, image: np.ndarray):
        """Resize (on the CPU, where antialiasing works everywhere) and normalise, as the model was trained."""
        import torch
        import torch.nn.functional as F

        rows, cols = image.shape
        size = self.image_size
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        if self.preprocessing in ("sam", "litemedsam"):
            scale = size / max(rows, cols)
            input_size = (int(rows * scale + 0.5), int(cols * scale + 0.5))
            x = F.interpolate(x, input_size, mode="bilinear", align_corners=False, antialias=True)
            if self.preprocessing == "sam":
                x = x.expand(1, 3, *input_size).to(self.device) * 255.0
                x = self.model.preprocess(x)  # pixel mean/std, zero padding to a square
            else:
                low, high = x.min(), x.max()
                x = (x - low) / torch.clamp(high - low, min=1e-8)
                x = F.pad(x, (0, size - input_size[1], 0, size - input_size[0])).expand(1, 3, size, size)
                x = x.to(self.device)
        else:
            # MedSAM: a plain resize to the square input, values in [0, 1], no mean/std.
            input_size = (size, size)
            x = F.interpolate(x, input_size, mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0).expand(1, 3, size, size).to(self.device)
        return x, input_size

    def encode(self, image: np.ndarray) -> Embedding:
        return self.encode_batch([image])[0]

    def encode_batch(self, images: list[np.ndarray]) -> list[Embedding]:
        """One forward pass of the image encoder over images of one shape (a server batches users' slices)."""
        import torch

        if any(image.ndim != 2 for image in images):
            raise ValueError(f"expected 2D images, got shapes {[image.shape for image in images]}")
        if len({image.shape for image in images}) > 1:
            return [embedding for image in images for embedding in self.encode_batch([image])]
        with torch.inference_mode():
            inputs = [self.model_input(image) for image in images]
            x = torch.cat([model_input for model_input, _ in inputs])
            with self.autocast():
                features = self.encoder(x)
            features = features.to(self.storage_dtype)
        embeddings = []
        for index, (image, (_, input_size)) in enumerate(zip(images, inputs)):
            # A copy, so that each cached embedding owns its memory (a view would pin the whole batch).
            single = features[index : index + 1].clone() if len(images) > 1 else features.contiguous()
            embeddings.append(
                Embedding(
                    features=single,
                    image_shape=tuple(image.shape),
                    nbytes=single.numel() * single.element_size(),
                    extra={"input_size": input_size},
                )
            )
        return embeddings

    def prompt_tensors(self, prompts: Prompts2D, image_shape, input_size):
        """Points (coordinates, labels) and box as the prompt encoder takes them, on the model's input grid."""
        import torch

        rows, cols = image_shape
        input_rows, input_cols = input_size
        scaled = prompts.scaled(input_cols / cols, input_rows / rows)
        points = boxes = None
        if len(scaled.points):
            coords = torch.as_tensor(scaled.points, device=self.device)[None]
            labels = torch.as_tensor(scaled.labels, dtype=torch.int, device=self.device)[None]
            points = (coords, labels)
        if scaled.box is not None:
            boxes = torch.as_tensor(scaled.box, device=self.device)[None]
        return points, boxes

    def decoder_forward(self, features, prompts: Prompts2D, image_shape, input_size, mask_input=None,
                        multimask: bool = False):  # fmt: skip
        """Prompt encoder and mask decoder on one image's features: (low-res logits (1, M, h, w), IoU (1, M)).

        ``prompts`` are in the pixels of the image that was encoded (``image_shape``); ``mask_input`` is the
        previous low-res logits as a (1, 1, h, w) tensor. Gradients flow when called outside inference mode:
        fine-tuning trains the decoder through this same path.
        """
        sparse, dense = self.model.prompt_encoder(*self.prompt_tensors(prompts, image_shape, input_size), mask_input)
        return self.model.mask_decoder(
            image_embeddings=features.float(),
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )

    def prepared_image(self, features):
        """The decoder's prompt-independent work on an embedding, kept for the last one (a user clicks on one
        slice at a time; propagation visits each slice once)."""
        from .sam_decoder import prepare_image, weights_version

        prepared = self._prepared
        if prepared is None or prepared.features is not features or prepared.weights != weights_version(self.model):
            prepared = self._prepared = prepare_image(self.model, features)
        return prepared

    def image_mask(self, low_res, input_size, image_shape):
        """Low-res logits (N, 1, h, w) as a boolean mask on the encoded image's grid (N, 1, rows, cols)."""
        import torch
        import torch.nn.functional as F

        if self.preprocessing != "medsam":  # the padded square, cropped to the image, then resized
            logits = self.model.postprocess_masks(low_res, tuple(input_size), tuple(image_shape))
            return logits > self.model.mask_threshold
        # MedSAM's own inference: the probability resized, then cut at 0.5.
        probability = F.interpolate(torch.sigmoid(low_res), tuple(image_shape), mode="bilinear", align_corners=False)
        return probability > 0.5

    def low_res_target(self, mask: np.ndarray, input_size) -> np.ndarray:
        """A mask on the encoded image's grid, on the decoder's low-res grid (float in [0, 1]): a training target."""
        size = int(self.model.prompt_encoder.mask_input_size[0])
        return _low_res_target(mask, input_size, self.image_size, size, pad=self.preprocessing != "medsam")

    def decode(self, embedding: Embedding, prompts: Prompts2D, previous_logits: np.ndarray | None = None) -> Prediction:
        import torch

        self.check_prompts(prompts)
        multimask = prompts.is_single_point and previous_logits is None
        with torch.inference_mode():
            masks = None
            if previous_logits is not None:
                masks = torch.as_tensor(previous_logits, dtype=torch.float32, device=self.device).reshape(
                    1, 1, *previous_logits.shape[-2:]
                )
            input_size = embedding.extra["input_size"]
            # The decoder's prompt-independent part is done once per slice (sam_decoder.py says why); a mask
            # input changes it, so a refining click computes its own.
            from .sam_decoder import decode_masks, prepare_image

            points, boxes = self.prompt_tensors(prompts, embedding.image_shape, input_size)
            sparse, dense = self.model.prompt_encoder(points, boxes, masks)
            if masks is None:
                prepared = self.prepared_image(embedding.features)
            else:
                prepared = prepare_image(self.model, embedding.features, dense)
            low_res, iou = decode_masks(self.model, prepared, sparse)
            # Tokens 1-3 answer a lone click (part, object, whole); token 0 everything else.
            low_res, iou = (low_res[:, 1:], iou[:, 1:]) if multimask else (low_res[:, :1], iou[:, :1])
            best = int(torch.argmax(iou[0])) if multimask else 0
            chosen = low_res[:, best : best + 1]
            # Upsample only the chosen mask: the other two would cost as much again.
            mask = self.image_mask(chosen, input_size, embedding.image_shape)[0, 0]
            return Prediction(
                mask=mask.cpu().numpy(),
                score=float(iou[0, best]),
                low_res_logits=chosen[0].float().cpu().numpy(),
            )


def _low_res_target(mask: np.ndarray, input_size, image_size: int, low_res_size: int, pad: bool) -> np.ndarray:
    """``mask`` resized as the image was (to ``input_size``, padded to the square when ``pad``), then averaged
    down to the decoder's low-res grid: the fraction of each low-res cell inside the mask."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    size = tuple(input_size) if pad else (image_size, image_size)
    x = F.interpolate(x, size, mode="bilinear", align_corners=False)
    if pad:
        x = F.pad(x, (0, image_size - size[1], 0, image_size - size[0]))
    return F.interpolate(x, (low_res_size, low_res_size), mode="area")[0, 0].numpy()
