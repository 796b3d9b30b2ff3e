"""Fine-tuning from the segmentations in a Slicer scene, on a worker thread, without the GUI.

``casesFromScene`` exports segmentation nodes as training cases: each segmentation node with its
volume is one case, and its segments become the label values 1, 2, ... (in the segmentation's order)
on the volume's own voxel grid, through Slicer's segmentation logic (as ``bridge.segment_array``).

``FinetuneTask`` runs ``training.run.finetune`` on a ``threading.Thread``. The cases are exported on
the calling thread first: the worker holds numpy arrays only and never touches MRML. The GUI polls
``progress()`` (a copy made under a lock) from a timer; ``stop()`` asks training to end early, and the
best weights so far are still saved and registered. ``error`` is one line, never a traceback::

    cases = casesFromScene(slicer.mrmlScene)
    task = FinetuneTask(cases, "sam_vit_b", "liver_sam", store, epochs=20)
    task.start()
    ... task.progress(), describeProgress(task.progress()), task.stop() ...

Names are camelCase, as everywhere in Slicer-facing classes.
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path

from ..errors import MedFMError, ModelError
from .bridge import segment_array, volume_from_node

FINETUNE_ENGINES = ("sam", "sam2")


def _label(node) -> str:
    return f"'{node.GetName()}'" if node.GetName() else "the segmentation"


def referenceVolumeNode(segmentationNode):
    """The volume a segmentation was made on (its reference geometry), or None."""
    return segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())


def _pairs(source) -> list[tuple]:
    """(segmentation node, volume node) pairs from a scene, segmentation nodes, or pairs."""
    if hasattr(source, "GetNodesByClass"):  # a scene: every segmentation node in it
        collection = source.GetNodesByClass("vtkMRMLSegmentationNode")
        source = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    pairs = []
    for item in source:
        segmentationNode, volumeNode = item if isinstance(item, (tuple, list)) else (item, None)
        if volumeNode is None:
            volumeNode = referenceVolumeNode(segmentationNode)
        if volumeNode is None:
            raise MedFMError(f"The segmentation {_label(segmentationNode)} has no volume: select its source volume "
                             "in the Segment Editor, or leave it out.")  # fmt: skip
        pairs.append((segmentationNode, volumeNode))
    return pairs


def labelsFromSegmentation(segmentationNode, volume):
    """The segments as one (K, J, I) int32 label map on ``volume``'s grid: segment n (from 1) is value n.

    Where segments overlap, the later segment's value wins.
    """
    import numpy as np
    from slicer import vtkSegmentationConverter

    segmentation = segmentationNode.GetSegmentation()
    labelmapName = vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() and not segmentation.ContainsRepresentation(labelmapName):
        segmentation.CreateRepresentation(labelmapName)  # segments held as surfaces: voxelise them, as Slicer does
    labels = np.zeros(volume.array.shape, np.int32)
    for value in range(1, segmentation.GetNumberOfSegments() + 1):
        labels[segment_array(segmentationNode, segmentation.GetNthSegmentID(value - 1), volume)] = value
    return labels


def casesFromScene(source) -> list:
    """Training cases (``MemoryCase``) from a scene, a list of segmentation nodes, or (segmentation, volume) pairs.

    A segmentation node without a volume of its own must come paired with one. A segmentation with no
    voxel in any segment is refused with one line naming it.
    """
    from ..training.embeddings import MemoryCase

    cases, names = [], set()
    for segmentationNode, volumeNode in _pairs(source):
        volume = volume_from_node(volumeNode)
        labels = labelsFromSegmentation(segmentationNode, volume)
        if not labels.any():
            raise MedFMError(f"The segmentation {_label(segmentationNode)} is empty on '{volumeNode.GetName()}': "
                             "paint its segments first, or leave it out.")  # fmt: skip
        name = segmentationNode.GetName() or "segmentation"
        base, number = name, 1
        while name in names:  # case names key the embedding cache: keep them apart
            number += 1
            name = f"{base} ({number})"
        names.add(name)
        cases.append(MemoryCase(name, volume, labels))
    if not cases:
        raise MedFMError("No segmentation selected: pick the segmentations to train on.")
    return cases


def finetuneBaseModels(store) -> list[str]:
    """The models that can be fine-tuned: SAM-family ones (fine-tuned ones included)."""
    return [name for name, info in store.models().items() if info.engine in FINETUNE_ENGINES]


def describeProgress(progress: dict) -> str:
    """One line for the GUI from ``FinetuneTask.progress()``."""
    phase = progress.get("phase", "")
    if phase == "embedding":
        return f"Embedding the labelled slices: {progress['done']}/{progress['total']}"
    if phase == "training":
        text = f"Epoch {progress['epoch']}/{progress['epochs']}: {progress['done']}/{progress['total']} objects"
        if progress.get("loss") is not None:
            text += f", loss {progress['loss']:.4f}"
        if progress.get("valDice") is not None:
            text += f", validation Dice {progress['valDice']:.3f} (epoch {progress['dicedEpoch']})"
        return text
    return {"starting": "Loading the base model...", "stopping": "Stopping after this step...", "done": "Done.",
            "failed": "Failed."}.get(phase, phase)  # fmt: skip


def describeResult(run) -> str:
    """One line on a finished run: validation Dice before and after, and how training ended."""
    result = run.result
    ended = {"stopped": "stopped", "early stop": "stopped early (no better validation Dice)"}.get(result.reason, "")
    epochs = f"{len(result.history)} epoch{'s' if len(result.history) != 1 else ''}"
    best = f"best epoch {result.best_epoch}" if result.best_epoch else "no epoch beat the base model; its weights kept"
    return (f"'{run.name}' is ready: validation Dice {result.dice_before:.3f} -> {result.best_dice:.3f} "
            f"({epochs}{', ' + ended if ended else ''}; {best}).")  # fmt: skip


class FinetuneTask:
    """Fine-tunes ``baseModel`` into ``newName`` on a worker thread; poll ``progress()``, ``isRunning``.

    Everything that can be checked at once (the name, the base model, two cases or more) is checked in
    the constructor, on the calling thread, as a ``MedFMError``. After the thread ends, ``result`` is the
    ``FinetuneRun`` or ``error`` its one-line error.
    """

    def __init__(
        self,
        cases,
        baseModel: str,
        newName: str,
        store=None,
        epochs: int = 20,
        valFraction: float = 0.2,
        device: str = "auto",
        seed: int = 0,
        work=None,
        config=None,
    ) -> None:
        """``config`` (a ``FinetuneConfig``), when given, is used as it is (its epochs, not ``epochs``)."""
        from ..models.store import ModelStore
        from ..training.prompts import PROMPT_KINDS
        from ..training.run import split_cases
        from ..training.trainer import FinetuneConfig

        self.store = store if store is not None else ModelStore()
        self.baseModel, self.newName, self.device = baseModel, (newName or "").strip(), device
        if not self.newName:
            raise MedFMError("Give the fine-tuned model a name.")
        self.store.check_new_name(self.newName)
        info = self.store.info(baseModel)
        if info.engine not in FINETUNE_ENGINES:
            raise ModelError(f"'{baseModel}' is not a SAM-family model: fine-tuning takes SAM, MedSAM, LiteMedSAM, "
                             "MobileSAM, SAM 2 or MedSAM2.")  # fmt: skip
        if not self.store.is_ready(baseModel):
            raise ModelError(f"'{baseModel}' is not downloaded yet: download it first (Model section), then train.")
        if config is None:
            prompts = ("box", "clicks") if tuple(info.prompts) == ("box",) else PROMPT_KINDS
            config = FinetuneConfig(epochs=int(epochs), seed=seed, prompts=prompts)
        self.config = config
        cases = list(cases)
        if len(cases) < 2:  # said here for the panel: split_cases' line names the command line's options
            raise MedFMError(f"Fine-tuning needs two segmentations or more (one to train on, one to validate); "
                             f"{len(cases)} given.")  # fmt: skip
        self.trainCases, self.valCases = split_cases(cases, valFraction, seed)
        self.work = Path(work) if work is not None else self.store.home / "finetune" / self.newName
        self.result = None
        self.error: str | None = None
        #: the traceback of an unexpected error, for the GUI thread to log (``error`` is what users read)
        self.errorDetails: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = {"phase": "starting", "done": 0, "total": 0, "epoch": 0, "epochs": self.config.epochs,
                          "loss": None, "valDice": None, "dicedEpoch": 0, "note": ""}  # fmt: skip
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ GUI thread
    def start(self) -> None:
        if self._thread is not None:
            raise MedFMError("This fine-tuning task has already run; make a new one.")
        # A daemon: closing Slicer does not wait for training (a model is saved whole or not at all).
        self._thread = threading.Thread(target=self._run, name=f"MedFM fine-tune {self.newName}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask training to end after the current step; the best weights so far are saved."""
        self._stop.set()
        self._update(phase="stopping")

    @property
    def isRunning(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end; True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.isRunning

    def progress(self) -> dict:
        """A copy of the latest progress: phase, done, total, epoch, epochs, loss, valDice, dicedEpoch, note."""
        with self._lock:
            return dict(self._progress)

    # --------------------------------------------------------- worker thread
    def _update(self, **values) -> None:
        with self._lock:
            if self._progress["phase"] in ("done", "failed"):
                return
            if self._stop.is_set() and values.get("phase") in ("embedding", "training"):
                values.pop("phase")  # keep saying "stopping" until the run ends
            self._progress.update(values)

    def _onProgress(self, phase: str, done: int, total: int, info: dict) -> None:
        if phase == "note":
            self._update(note=info.get("note", ""))
        elif phase == "embedding":
            self._update(phase="embedding", done=done, total=total)
        elif phase.startswith("epoch "):
            epoch, epochs = (int(n) for n in phase.split()[1].split("/"))
            values = {"phase": "training", "done": done, "total": total, "epoch": epoch, "epochs": epochs}
            if "loss" in info:
                values["loss"] = float(info["loss"])
            if "val_dice" in info:  # the epoch's end
                values.update(valDice=float(info["val_dice"]), dicedEpoch=epoch)
            self._update(**values)

    def _run(self) -> None:
        from ..training.run import finetune

        try:
            self.result = finetune(self.trainCases, self.valCases, self.baseModel, self.newName, self.store,
                                   self.config, self.work, device=self.device, progress=self._onProgress,
                                   stop=self._stop.is_set)  # fmt: skip
        except MedFMError as error:
            self.error = str(error).splitlines()[0] if str(error) else type(error).__name__
        except Exception as error:  # a bug or the accelerator's limits: one line, and the traceback for the log
            from .logic import isOutOfMemory

            self.errorDetails = traceback.format_exc()
            if isOutOfMemory(error):
                self.error = "Out of memory on the accelerator: choose the CPU as the device, or a smaller model."
            else:
                self.error = f"Fine-tuning failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        with self._lock:
            self._progress["phase"] = "failed" if self.error is not None else "done"
