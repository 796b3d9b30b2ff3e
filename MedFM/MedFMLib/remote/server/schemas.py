"""What each server call accepts, checked before anything runs (pydantic).

A request that does not fit gets a 422 that names the field and the problem.
Only the session methods listed here can be called.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ...interaction.propagation import PropagationOptions, StopCriteria

Finite = Annotated[float, Field(allow_inf_nan=False)]
Ras = Annotated[list[Finite], Field(min_length=3, max_length=3)]
Colour = Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], Field(min_length=3, max_length=3)]
# "axial"/"coronal"/"sagittal", an IJK axis, or a slice normal in RAS
View = Union[Literal["axial", "coronal", "sagittal"], Annotated[int, Field(ge=0, le=2)], Ras]
ObjectId = Annotated[int, Field(ge=1, lt=2**31)]
PromptId = Annotated[int, Field(ge=1, lt=2**31)]
Index = Annotated[int, Field(ge=0, lt=2**31)]
MatrixRow = Annotated[list[Finite], Field(min_length=4, max_length=4)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CriteriaArgs(Strict):
    min_area_pixels: Annotated[int, Field(ge=0)] = 4
    min_area_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.15
    min_score: Finite = 0.5  # a random model's predicted IoU can be negative
    min_overlap: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    max_area_ratio: Annotated[float, Field(ge=1.0, le=1000.0)] = 2.5
    growth_allowance_pixels: Annotated[int, Field(ge=0)] = 50
    min_object_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5


class OptionsArgs(Strict):
    criteria: CriteriaArgs = CriteriaArgs()
    use_box: bool = True
    box_margin_pixels: Annotated[float, Field(ge=0.0, le=1000.0)] = 3.0
    box_margin_fraction: Annotated[float, Field(ge=0.0, le=10.0)] = 0.1
    use_point: bool = True
    use_mask: bool = True
    use_memory: bool = True
    use_appearance: bool = True
    box_widenings: Annotated[int, Field(ge=0, le=20)] = 3
    box_widen_fraction: Annotated[float, Field(ge=0.0, le=10.0)] = 0.25
    grown_box_fraction: Annotated[float, Field(ge=0.0, le=10.0)] = 0.25
    grown_box_min_gain: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    converge_dice: Annotated[float, Field(ge=0.0, le=1.0)] = 0.97
    roi_bounds_footprint: bool = True

    def to_options(self) -> PropagationOptions:
        values = self.model_dump()
        return PropagationOptions(**dict(values, criteria=StopCriteria(**values["criteria"])))


class NoArgs(Strict):
    pass


class AddObject(Strict):
    name: Optional[Annotated[str, Field(max_length=200)]] = None
    color: Optional[Colour] = None


class ObjectArgs(Strict):
    object_id: ObjectId


class AddPoint(ObjectArgs):
    ras: Ras
    positive: bool = True
    view: View = "axial"


class SetBox(ObjectArgs):
    corner_a: Ras
    corner_b: Ras
    view: View = "axial"
    keep_other_slices: bool = False


class MovePrompt(ObjectArgs):
    prompt_id: PromptId
    ras: Ras


class MoveBox(ObjectArgs):
    corner_a: Ras
    corner_b: Ras


class RemovePrompt(ObjectArgs):
    prompt_id: PromptId


class SetRoi(ObjectArgs):
    corners: Annotated[list[Ras], Field(min_length=2, max_length=8)]
    view: View = "axial"
    propagate: bool = True
    options: Optional[OptionsArgs] = None


class Propagate(ObjectArgs):
    direction: Literal["both", "forward", "backward"] = "both"
    view: Optional[View] = None
    start: Optional[Index] = None
    until_converged: bool = False
    options: Optional[OptionsArgs] = None


class Repropagate(ObjectArgs):
    plane: Annotated[list[Index], Field(min_length=2, max_length=2)]
    options: Optional[OptionsArgs] = None


class AddStroke(ObjectArgs):
    """A scribble or a lasso: RAS points along it, drawn on one slice of the view (3D models)."""

    ras_points: Annotated[list[Ras], Field(min_length=1, max_length=4096)]
    positive: bool = True
    view: View = "axial"


class SetClass(ObjectArgs):
    class_name: Annotated[str, Field(min_length=1, max_length=100)]


class ApplyPropagation(Strict):
    result: Annotated[int, Field(ge=1)]


class EncodePlanes(Strict):
    planes: Annotated[list[Annotated[list[Index], Field(min_length=2, max_length=2)]], Field(max_length=64)]


#: the session methods a client may call, and their arguments
METHODS: dict[str, type[Strict]] = {
    "add_object": AddObject,
    "remove_object": ObjectArgs,
    "add_point": AddPoint,
    "set_box": SetBox,
    "move_prompt": MovePrompt,
    "move_box": MoveBox,
    "remove_prompt": RemovePrompt,
    "clear_object": ObjectArgs,
    "set_roi": SetRoi,
    "plan_roi": SetRoi,
    "propagate": Propagate,
    "plan_propagation": Propagate,
    "repropagate": Repropagate,
    "apply_propagation": ApplyPropagation,
    "undo": NoArgs,
    "redo": NoArgs,
    "prompt_seeds": ObjectArgs,
    # native 3D models only
    "add_scribble": AddStroke,
    "add_lasso": AddStroke,
    "set_class": SetClass,
}
#: methods only a 3D model's session has
VOLUME_METHODS = ("add_scribble", "add_lasso", "set_class")
#: methods that may run as a background job with progress
JOB_METHODS = ("plan_propagation", "plan_roi")


class VolumeHeader(Strict):
    """The JSON header of a volume upload (the voxels are the frame's one part)."""

    model: Annotated[str, Field(min_length=1, max_length=200)]
    ijk_to_ras: Annotated[
        list[Annotated[list[Finite], Field(min_length=4, max_length=4)]], Field(min_length=4, max_length=4)
    ]
    array: dict
    window: Optional[Annotated[list[Finite], Field(min_length=2, max_length=2)]] = None
    isotropic: Optional[bool] = None
    parts: list[int]


class FinetuneSettings(Strict):
    """A fine-tuning job's settings (the decoder trains; see ``training.trainer.FinetuneConfig``)."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 20
    lr: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1e-4
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    prompts: Annotated[list[Literal["box", "points", "clicks"]], Field(min_length=1, max_length=3)] = [
        "box", "points", "clicks",
    ]  # fmt: skip
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2


class FinetuneCase(Strict):
    """One case of a fine-tuning upload: its geometry, and how its image and label map are encoded."""

    ijk_to_ras: Annotated[list[MatrixRow], Field(min_length=4, max_length=4)]
    image: dict
    labels: dict


class FinetuneHeader(Strict):
    """The JSON header of a fine-tuning upload (each case's image, then its label map, are the frame's parts)."""

    base: Annotated[str, Field(min_length=1, max_length=200)]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    config: FinetuneSettings = FinetuneSettings()
    cases: Annotated[list[FinetuneCase], Field(max_length=500)]
    parts: list[int]
