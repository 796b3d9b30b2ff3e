"""Scripted runs of the app: a list of user actions replayed through the real window, as real Qt events.

Each click or drag is a mouse move, press and release delivered to the view's widget at the pixel where
the RAS point is shown (the view first shows the slice through it, as a user scrolls there). Keys are key
events on the view; buttons are the toolbar's own actions. For tests, bug reports and screenshots::

    [{"action": "click", "view": "axial", "ras": [R, A, S], "negative": false},
     {"action": "box", "view": "axial", "from": [R, A, S], "to": [R, A, S]},
     {"action": "key", "key": "z"},
     {"action": "button", "name": "propagate-both"},
     {"action": "wait"},
     {"action": "screenshot", "path": "shot.png"}]
"""

from __future__ import annotations

import json
from pathlib import Path

from Qt import QtCore, QtGui, QtWidgets

from ..errors import MedFMError
from .views import VIEWS
from .window import BUTTONS, MedFMWindow

ACTIONS = ("click", "box", "drag", "scribble", "lasso", "class", "key", "button", "wait", "screenshot")


def load_actions(path: str | Path) -> list[dict]:
    """Read and check a replay file: one clear line for whatever is wrong in it."""
    path = Path(path)
    try:
        actions = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedFMError(f"Cannot read the replay {path.name}: {exc}. It must be a JSON list of actions.") from None
    if not isinstance(actions, list):
        raise MedFMError(f"The replay {path.name} must be a JSON list of actions, not {type(actions).__name__}.")
    for number, action in enumerate(actions, start=1):
        kind = action.get("action") if isinstance(action, dict) else None
        if kind not in ACTIONS:
            choices = ", ".join(ACTIONS)
            raise MedFMError(f"Action {number} of {path.name} is {action!r}: 'action' must be one of {choices}.")
        if kind in ("scribble", "lasso") and len(action.get("points") or []) < 2:
            raise MedFMError(f"Action {number}: a {kind} needs 'points', a list of at least two [R, A, S].")
        if kind in ("click", "box", "drag", "scribble", "lasso") and action.get("view", "axial") not in VIEWS:
            raise MedFMError(f"Action {number}: view {action.get('view')!r} is not one of {', '.join(VIEWS)}.")
        if kind == "button" and action.get("name") not in BUTTONS:
            raise MedFMError(f"Action {number}: button {action.get('name')!r} is not one of {', '.join(BUTTONS)}.")
    return actions


class Replayer:
    """Delivers actions to a window; ``run`` returns once the last one is done."""

    def __init__(self, window: MedFMWindow, timeoutSeconds: float = 300.0) -> None:
        self.window = window
        self.timeoutSeconds = timeoutSeconds
        self.lastView = window.views["axial"]

    def run(self, actions: list[dict]) -> None:
        for action in actions:
            getattr(self, f"_{action['action']}")(action)
            self.pump()

    @staticmethod
    def pump() -> None:
        for _ in range(3):
            QtWidgets.QApplication.processEvents()

    # ------------------------------------------------------------------ mouse
    def _viewAt(self, action: dict, ras):
        view = self.window.views[action.get("view", "axial")]
        view.showSliceThrough(ras)
        view.render()
        self.pump()
        self.lastView = view
        return view

    def _mouse(self, view, kind, ras, buttons, modifiers=QtCore.Qt.NoModifier) -> None:
        x, y = view.rasToWidget(ras)
        local = QtCore.QPointF(x, y)
        button = QtCore.Qt.LeftButton if kind != QtCore.QEvent.MouseMove else QtCore.Qt.NoButton
        event = QtGui.QMouseEvent(kind, local, view.widget.mapToGlobal(local), button, buttons, modifiers)
        QtWidgets.QApplication.sendEvent(view.widget, event)
        self.pump()

    def _click(self, action: dict) -> None:
        ras = action["ras"]
        view = self._viewAt(action, ras)
        modifiers = QtCore.Qt.ShiftModifier if action.get("negative") else QtCore.Qt.NoModifier
        self._mouse(view, QtCore.QEvent.MouseMove, ras, QtCore.Qt.NoButton, modifiers)  # a move must come first
        self._mouse(view, QtCore.QEvent.MouseButtonPress, ras, QtCore.Qt.LeftButton, modifiers)
        self._mouse(view, QtCore.QEvent.MouseButtonRelease, ras, QtCore.Qt.NoButton, modifiers)

    def _drag(self, action: dict, mode: str | None = None) -> None:
        start, end = action["from"], action["to"]
        view = self._viewAt(action, start)
        previous = self.window.controller.mode
        if mode is not None:
            self.window.setMode(mode)
        self._mouse(view, QtCore.QEvent.MouseMove, start, QtCore.Qt.NoButton)
        self._mouse(view, QtCore.QEvent.MouseButtonPress, start, QtCore.Qt.LeftButton)
        for fraction in (0.25, 0.5, 0.75, 1.0):
            point = [a + fraction * (b - a) for a, b in zip(start, end)]
            self._mouse(view, QtCore.QEvent.MouseMove, point, QtCore.Qt.LeftButton)
        self._mouse(view, QtCore.QEvent.MouseButtonRelease, end, QtCore.Qt.NoButton)
        if mode is not None:
            self.window.setMode(previous)

    def _box(self, action: dict) -> None:
        self._drag(action, mode="box")

    def _stroke(self, action: dict) -> None:
        """A scribble or lasso drawn with the button held through its points (Shift when ``negative``)."""
        points = action["points"]
        view = self._viewAt(action, points[0])
        previous = self.window.controller.mode
        self.window.setMode(action["action"])
        modifiers = QtCore.Qt.ShiftModifier if action.get("negative") else QtCore.Qt.NoModifier
        self._mouse(view, QtCore.QEvent.MouseMove, points[0], QtCore.Qt.NoButton, modifiers)
        self._mouse(view, QtCore.QEvent.MouseButtonPress, points[0], QtCore.Qt.LeftButton, modifiers)
        for point in points[1:]:
            self._mouse(view, QtCore.QEvent.MouseMove, point, QtCore.Qt.LeftButton, modifiers)
        self._mouse(view, QtCore.QEvent.MouseButtonRelease, points[-1], QtCore.Qt.NoButton, modifiers)
        self.window.setMode(previous)

    _scribble = _lasso = _stroke

    def _class(self, action: dict) -> None:
        """A class prompt, as the user gives it: the name in the class box, then Segment class."""
        panel = self.window.modelPanel
        panel.classChooser.setCurrentText(str(action.get("name", "")))
        panel.classButton.click()

    # ------------------------------------------------------------------ keys, buttons, waiting
    def _key(self, action: dict) -> None:
        key = str(action["key"])
        special = {"Return": (QtCore.Qt.Key_Return, "\r"), "Escape": (QtCore.Qt.Key_Escape, "\x1b")}
        code, text = special.get(key, (QtGui.QKeySequence(key.upper())[0].key() if key else 0, key))
        for kind in (QtCore.QEvent.KeyPress, QtCore.QEvent.KeyRelease):
            event = QtGui.QKeyEvent(kind, code, QtCore.Qt.NoModifier, text)
            QtWidgets.QApplication.sendEvent(self.lastView.widget, event)
        self.pump()

    def _button(self, action: dict) -> None:
        self.window.buttons[action["name"]].trigger()

    def _wait(self, action: dict) -> None:
        if not self.window.controller.waitUntilIdle(self.timeoutSeconds, pump=self.pump):
            raise MedFMError(f"Still busy after {self.timeoutSeconds:.0f} s: {self.window.controller.status}")
        self.window.refresh()
        for view in self.window.views.values():
            view.render()

    def _screenshot(self, action: dict) -> None:
        self._wait(action)
        self.window.screenshot(action["path"])
