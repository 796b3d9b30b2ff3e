"""The controller with native 3D models, headless on real MRML: clicks, strokes, class prompts, undo, Apply.

The models are tiny random-weight nnInteractive and VISTA3D in their official layouts: what is checked is
where prompts go, what the preview and the segment hold, and what the user is told.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_controller import DIMS, LESION_AT, MATRIX, ORGAN_AT, Editor, k_of, ras_of

from MedFMLib.imaging.phantoms import Ellipsoid, render
from MedFMLib.mrml.bridge import segment_array
from MedFMLib.mrml.controller import ControllerSettings


@pytest.fixture
def phantom():
    """The organ and lesion phantom of the slice-model controller tests."""
    organ = Ellipsoid(tuple(ORGAN_AT), (7.0, 7.0, 22.0), 200.0)
    lesion = Ellipsoid(tuple(LESION_AT), (4.5, 4.5, 4.5), 200.0)
    volume, masks = render(DIMS, MATRIX, [organ, lesion], background=0.0, name="phantom")
    return volume, *masks


@pytest.fixture
def editor3d(mrml_scene, phantom, tmp_path, tiny_volume_models):
    made = Editor(mrml_scene, phantom[0], tmp_path, ControllerSettings(modelName="nninteractive_tiny", device="cpu"))
    made.logic.store = type(made.logic.store)(tiny_volume_models)
    yield made
    made.controller.close()


def test_a_click_answers_in_3d_and_propagation_is_explained_not_run(editor3d):
    controller = editor3d.controller
    editor3d.click(ORGAN_AT)
    editor3d.idle()
    assert controller.volumetric and controller.hasPrompts and controller.canApply
    assert not controller.canPropagate and controller.modelDescription == "nninteractive_tiny on cpu"
    np.testing.assert_array_equal(editor3d.preview(), controller.session.engine.mask)
    shown = segment_array(controller.previewNode, controller.previewSegmentId, editor3d.volume)
    np.testing.assert_array_equal(shown, editor3d.preview())
    controller.propagate("both")
    assert "answers in 3D already" in controller.status and controller.job is None
    # A negative click with Shift, then undo: the markups follow the session's prompts.
    editor3d.click(LESION_AT, shift=True)
    editor3d.idle()
    assert controller.negativeNode.GetNumberOfControlPoints() == 1
    controller.undo()
    assert controller.negativeNode.GetNumberOfControlPoints() == 0
    assert controller.positiveNode.GetNumberOfControlPoints() == 1


def test_deleting_a_control_point_segments_again_without_it(editor3d):
    controller = editor3d.controller
    editor3d.click(ORGAN_AT)
    editor3d.idle()
    editor3d.click(LESION_AT, shift=True)
    editor3d.idle()
    assert len(controller.session.volume_prompts(controller.objectId)) == 2
    controller.negativeNode.RemoveNthControlPoint(0)  # what Slicer's right-click Delete does
    editor3d.idle()
    assert [p.kind for p in controller.session.volume_prompts(controller.objectId)] == ["point"]


def test_a_scribble_and_a_lasso_drawn_with_the_mouse_reach_the_model_on_their_slice(editor3d):
    controller = editor3d.controller
    k = k_of(ORGAN_AT)
    controller.setMode("scribble")
    assert controller.pressAt(ras_of((10.0, 18.0, k)), editor3d.axial)
    for step in range(1, 8):
        assert controller.moveAt(ras_of((10.0 + step, 18.0 + step, k)))
    assert controller.releaseAt(ras_of((18.0, 26.0, k)))
    (scribble,) = controller.session.volume_prompts(controller.objectId)
    assert scribble.kind == "scribble" and scribble.positive and len(scribble.ras) >= 5
    assert controller.stroke.curveNode.GetNumberOfControlPoints() == len(scribble.ras)  # what was drawn stays shown
    controller.setMode("lasso")
    corners = [ras_of(c) for c in ((30.0, 15.0, k), (42.0, 15.0, k), (42.0, 26.0, k), (30.0, 26.0, k))]
    controller.pressAt(corners[0], editor3d.axial, shift=True)
    for corner in corners[1:]:
        controller.moveAt(corner)
    controller.releaseAt(corners[-1])
    lasso = controller.session.volume_prompts(controller.objectId)[-1]
    assert lasso.kind == "lasso" and not lasso.positive and lasso.axis == 2
    assert controller.stroke.curveNode.IsA("vtkMRMLMarkupsClosedCurveNode")
    assert not controller.moveAt(ORGAN_AT)  # no stroke is being drawn now: moves are Slicer's


def test_apply_writes_the_3d_answer_into_the_selected_segment(editor3d):
    controller = editor3d.controller
    editor3d.click(ORGAN_AT)
    editor3d.idle()
    answer = editor3d.preview().copy()
    assert controller.apply() and editor3d.undoStates == 1
    np.testing.assert_array_equal(editor3d.segment(), answer)  # every slice, not only the clicked one
    assert not controller.hasPrompts


def test_scribble_and_lasso_on_a_slice_model_become_clicks_and_a_box(mrml_scene, phantom, tmp_path):
    made = Editor(mrml_scene, phantom[0], tmp_path)  # classic: a slice model
    try:
        controller, k = made.controller, k_of(ORGAN_AT)
        controller.setMode("scribble")
        controller.pressAt(ras_of((11.0, 20.0, k)), made.axial)
        for step in range(1, 6):
            controller.moveAt(ras_of((11.0 + 2 * step, 20.0 + step, k)))
        controller.releaseAt(ras_of((23.0, 26.0, k)))
        made.idle()
        assert "became 5 clicks" in controller.status
        assert controller.positiveNode.GetNumberOfControlPoints() == 5
        assert made.preview()[k].any()
        controller.setMode("lasso")
        controller.pressAt(ras_of((30.0, 15.0, k)), made.axial)
        for corner in ((42.0, 15.0, k), (42.0, 26.0, k), (30.0, 26.0, k)):
            controller.moveAt(ras_of(corner))
        controller.releaseAt(ras_of((30.0, 26.0, k)))
        made.idle()
        assert "box around it" in controller.status and controller.roiNode.GetNumberOfControlPoints() == 1
    finally:
        made.controller.close()


def test_a_class_prompt_segments_the_class_and_unknown_names_get_a_suggestion(mrml_scene, phantom, tmp_path,
                                                                             tiny_volume_models):  # fmt: skip
    made = Editor(mrml_scene, phantom[0], tmp_path, ControllerSettings(modelName="vista3d_tiny", device="cpu"))
    made.logic.store = type(made.logic.store)(tiny_volume_models)
    try:
        controller = made.controller
        controller.setClass("livr")
        assert "liver" in controller.status and not controller.hasPrompts
        controller.setClass("liver")
        assert controller.status.startswith("liver: ") and controller.hasPrompts
        np.testing.assert_array_equal(made.preview(), controller.session.mask(controller.objectId))
    finally:
        made.controller.close()
