"""Where a SAM-family image encoder runs: eager torch, or OpenVINO on a CPU.

On a CPU, OpenVINO runs the same encoder 1.4-2.5× faster than eager torch (measured in the README). A
model is converted once (ViT-B takes minutes and several GB) and kept under ``$MEDFM_HOME/openvino``;
later starts only read it. The decoder stays in torch: it is milliseconds either way.

Precision is fp32 unless asked otherwise: OpenVINO would silently use bf16 on CPUs that have it, and
then masks move slightly. ``fast`` asks for bf16 where the CPU supports it (avx512_bf16 or AMX).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelError

RUNTIMES = ("auto", "torch", "openvino")
#: the layout the encoders are converted in; a new one converts them again (2: TinyViT's q, k, v apart)
EXPORT_LAYOUT = 2


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(runtime: str, device: str) -> str:
    """``auto``: OpenVINO on a machine without CUDA or MPS when it is installed, else torch."""
    if runtime not in RUNTIMES:
        raise ModelError(f"Unknown runtime '{runtime}': use one of {', '.join(RUNTIMES)}.")
    if runtime == "auto":
        return "openvino" if device == "cpu" and openvino_available() else "torch"
    if runtime == "openvino":
        if device != "cpu":
            raise ModelError(f"The OpenVINO runtime runs on the CPU, not on '{device}'; use --device cpu.")
        if not openvino_available():
            raise ModelError("The OpenVINO runtime needs the openvino package: pip install 'medfm[openvino]'.")
    return runtime


def bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (OpenVINO reports it as an optimisation capability)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@contextmanager
def _export_layout(encoder):
    """The encoder's modules in the layout OpenVINO runs best (``separate_qkv``), for the conversion only."""
    switched = [module for module in encoder.modules() if hasattr(module, "separate_qkv")]
    for module in switched:
        module.separate_qkv = True
    try:
        yield
    finally:
        for module in switched:
            module.separate_qkv = False


class OpenVinoEncoder:
    """A torch image encoder converted to OpenVINO once, cached on disk, compiled for this CPU.

    Called like the torch module: a (1, 3, S, S) float tensor in, the embedding tensor out.
    """

    def __init__(
        self,
        encoder,
        image_size: int,
        cache_dir: Path,
        key: str,
        fast: bool = False,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        import openvino as ov

        from ..models.download import file_lock

        self.precision = "bf16" if fast and bf16_supported() else "f32"
        digest = hashlib.sha256(f"{key}|{image_size}|{ov.__version__}|{EXPORT_LAYOUT}".encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"{digest}.xml"
        core = ov.Core()
        with file_lock(path.with_suffix(".lock")):  # two processes convert it once between them
            if not path.is_file():
                import torch

                if notify is not None:
                    notify(f"converting the image encoder for OpenVINO, once (a minute or more for ViT-B); "
                           f"it is kept in {path.parent}")  # fmt: skip
                example = torch.zeros(1, 3, image_size, image_size)
                with torch.no_grad(), warnings.catch_warnings(), _export_layout(encoder):
                    warnings.simplefilter("ignore")  # the tracer's deprecation notes are not the user's business
                    model = ov.convert_model(encoder, example_input=example, input=[1, 3, image_size, image_size])
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(path.stem + ".part.xml")
                ov.save_model(model, temporary, compress_to_fp16=False)  # the weights stay fp32
                temporary.with_suffix(".bin").replace(path.with_suffix(".bin"))
                temporary.replace(path)
            model = core.read_model(path)
        self.path = path
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": self.precision})

    def __call__(self, x):
        import torch

        outputs = [torch.from_numpy(self.compiled(image[None].numpy())[0]) for image in x]  # one image a call
        return torch.cat(outputs)
