"""MedFM's logic for Slicer, without the GUI: segment a volume node into a segment from markups.

``SegmentationLogic`` is the base of the module's ``MedFMLogic``. It needs only
MRML (``slicer``), vtk and numpy, so it runs from Slicer's Python console, in
scripts, and headless in tests on ``slicer-core``::

    logic = slicer.util.getModuleLogic("MedFM")
    segmentId = logic.segment(
        volumeNode, segmentationNode, segmentName="tumour",
        positivePointsNode=getNode("F"), roiNode=getNode("R"),
        view="axial", modelName="sam_vit_b",
    )

Names are camelCase, as everywhere in Slicer-facing classes.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import PromptError
from ..imaging.geometry import ViewLike
from ..imaging.intensity import Window, preset_window
from ..interaction.cache import EmbeddingCache
from .bridge import ensure_segment, volume_from_node, window_from_node, write_segment


def isOutOfMemory(error: BaseException) -> bool:
    """Whether an error is the accelerator running out of memory (offer the CPU then)."""
    try:
        import torch

        if isinstance(error, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = str(error).lower()
    return isinstance(error, RuntimeError) and "out of memory" in text


class SegmentationLogic:
    """Engines, the shared embedding cache, and volume-node-to-segment segmentation."""

    def __init__(self, store=None, cacheBudgetBytes: int | None = None) -> None:
        from ..models.store import ModelStore

        self.store = store if store is not None else ModelStore()
        self.cache = EmbeddingCache(cacheBudgetBytes) if cacheBudgetBytes else EmbeddingCache()
        self._engines: dict[tuple[str, str], object] = {}
        self.serverUrl = ""
        self.connection = None
        self.serverInfo: dict | None = None

    # ------------------------------------------------------------------ server
    def configureServer(self, url: str, token: str = "", caCert: str | None = None, check: bool = True):
        """Run models on a MedFM server (``url`` and its token), or locally again (empty ``url``).

        With ``check``, the server is asked at once (reachable, token accepted,
        same protocol) and its description is returned; errors are RemoteError
        lines for the GUI to show.
        """
        from ..remote.client import ServerConnection

        url = (url or "").strip()
        self.serverUrl, self.connection, self.serverInfo = url, None, None
        if not url:
            return None
        connection = ServerConnection(url, token, ca_cert=caCert or None)
        if check:
            patience, connection.reconnect_seconds = connection.reconnect_seconds, 2.0  # the GUI waits on this
            self.serverInfo = connection.check()
            connection.reconnect_seconds = patience
        self.connection = connection
        return self.serverInfo

    @property
    def isRemote(self) -> bool:
        return self.connection is not None

    def serverModels(self) -> dict[str, dict]:
        if self.serverInfo is None:
            self.serverInfo = self.connection.check()
        return {model["name"]: model for model in self.serverInfo["models"]}

    def createSession(self, volume, modelName: str, device: str = "auto", window: Window | None = None):
        """A session for the volume: on the server when one is configured, else with a local engine."""
        if self.isRemote:
            from ..remote.volume_client import open_remote_session

            return open_remote_session(self.connection, volume, modelName, window=window)
        engine = self.engine(modelName, device)
        if getattr(engine, "kind", "slice") == "volume":
            from ..interaction.volume_session import VolumeSession

            return VolumeSession(volume, engine)
        from ..interaction.session import Session

        return Session(volume, engine, window, self.cache)

    # ------------------------------------------------------------------ models
    def modelNames(self) -> list[str]:
        return list(self.serverModels()) if self.isRemote else list(self.store.models())

    def isModelReady(self, modelName: str) -> bool:
        if self.isRemote:
            return self.serverModels().get(modelName, {}).get("state", "not offered") in ("ready", "loaded")
        return self.store.is_ready(modelName)

    def downloadModel(self, modelName: str, progress: Callable | None = None):
        return self.store.download(modelName, progress=progress)

    def removeModel(self, modelName: str) -> bool:
        self._engines = {k: v for k, v in self._engines.items() if k[0] != modelName}
        return self.store.remove(modelName)

    #: what runs SAM-family encoders (auto: OpenVINO on a CPU when installed), and bf16 where the CPU has it
    runtime: str = "auto"
    fast: bool = False
    #: the small-object zoom where a model's catalog entry asks for it (interaction/zoom.py); False: never
    zoom: bool = True

    def engine(self, modelName: str, device: str = "auto"):
        """The engine for a model, loaded once and kept. A model not yet downloaded is an error, not a download:
        the GUI asks first, and scripts call ``downloadModel``."""
        from ..engines import create_engine

        key = (modelName, device, self.runtime, self.fast, self.zoom)
        if key not in self._engines:
            checkpoint = self.store.checkpoint(modelName, fetch=False)
            self._engines[key] = create_engine(modelName, checkpoint=checkpoint, device=device, store=self.store,
                                               runtime=self.runtime, fast=self.fast,
                                               zoom=None if self.zoom else False)  # fmt: skip
        return self._engines[key]

    # ---------------------------------------------------------------- segment
    def intensityWindow(self, volumeNode, intensity: str | Window | None = "viewer"):
        """The window the model sees: the viewer's window/level, a preset name, 'auto', or a Window."""
        if isinstance(intensity, Window):
            return intensity
        if intensity in (None, "viewer"):
            return window_from_node(volumeNode)  # None: robust percentiles
        if intensity == "auto":
            return None
        return preset_window(intensity)

    def segment(
        self,
        volumeNode,
        segmentationNode,
        segmentName: str | None = None,
        positivePointsNode=None,
        negativePointsNode=None,
        roiNode=None,
        view: ViewLike = "axial",
        modelName: str = "classic",
        device: str = "auto",
        intensity: str | Window | None = "viewer",
        editorNode=None,
    ) -> str:
        """Segment the slice the prompts are on, in the given view, into a segment; returns its ID.

        Positive and negative points come from markups point lists, the box
        from a markups ROI, or a box on each of several slices from a list of
        ROIs. Only the prompted slices of the segment change; the Segment
        Editor node's masking and overwrite settings apply when given. On any
        error the segmentation is left as it was.
        """
        from .prompt_sync import PromptSync

        volume = volume_from_node(volumeNode)
        if segmentationNode is None:
            raise PromptError("No segmentation selected: choose or create one to write into.")
        rois = [n for n in (roiNode if isinstance(roiNode, (list, tuple)) else [roiNode]) if n is not None]
        rois = [n for n in rois if n.GetNumberOfDefinedControlPoints()]
        if not rois and not (positivePointsNode is not None and positivePointsNode.GetNumberOfDefinedControlPoints()):
            raise PromptError("Place at least one positive point or a box to segment.")
        session = self.createSession(volume, modelName, device, self.intensityWindow(volumeNode, intensity))
        try:
            objectId = session.add_object(segmentName)
            sync = PromptSync(session, objectId, default_view=view)
            if len(rois) == 1:
                sync.sync_box(rois[0], view)
            for roi in rois if len(rois) > 1 else []:
                corner_a, corner_b, axis = sync.box_of_roi(roi, view)
                session.set_box(objectId, corner_a, corner_b, view=axis, keep_other_slices=True)
            _, rejected = sync.sync(positivePointsNode, negativePointsNode)
            if rejected:
                raise PromptError(rejected[0].message)
            segmentId = ensure_segment(segmentationNode, segmentName)
            write_segment(
                session.mask(objectId),
                volume,
                segmentationNode,
                segmentId,
                region=sync.touched_region(),
                editor_node=editorNode,
                source_volume_node=volumeNode,
            )
            return segmentId
        finally:
            if self.isRemote:
                session.close()  # free the server's memory now rather than at expiry
