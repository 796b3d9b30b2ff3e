"""`medfm app`: the command line of the desktop window, and its scripted runs (--replay)."""

from __future__ import annotations

import os
import sys

from ..errors import MedFMError


def add_parser(commands) -> None:
    app = commands.add_parser("app", help="MedFM's desktop window on Slicer's slice views (needs medfm[app])")
    app.add_argument("volumes", nargs="*", metavar="VOLUME", help="a volume file or DICOM folder to open")
    app.add_argument("--segmentation", help="a .seg.nrrd or labelmap of the volume, to refine")
    app.add_argument("--model", help="the model to segment with (default: the last one chosen)")
    app.add_argument("--device", help="auto, cpu, cuda or mps")
    app.add_argument("--server", help="run models on this MedFM server")
    app.add_argument("--token", default=os.environ.get("MEDFM_TOKEN", ""), help="the server's token ($MEDFM_TOKEN)")
    app.add_argument("--replay", metavar="ACTIONS.json", help="replay these user actions through the window")
    app.add_argument("--screenshot", metavar="PNG", help="save the whole window when the replay ends")
    app.add_argument("--save", metavar="SEG", help="save the segmentation when the replay ends (.seg.nrrd or labelmap)")
    app.add_argument("--exit", action="store_true", help="close the window when the replay ends")


def _qt_application():
    """The QApplication; headless (offscreen, OSMesa) where there is no display."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
        os.environ.setdefault("QT_LOGGING_RULES", "qt.qpa.*=false")  # "plugin does not support setParent" noise
    try:
        from Qt import QtWidgets
    except ImportError:
        raise MedFMError("medfm app needs Qt: pip install 'medfm[app]' (Qt.py and PySide6).") from None
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])


def cmd_app(args) -> int:
    app = _qt_application()
    from .replay import Replayer, load_actions
    from .window import MedFMWindow

    actions = load_actions(args.replay) if args.replay else None
    window = MedFMWindow(interactive=actions is None)
    try:
        if args.model:
            window.modelPanel.fillModels(window.logic.modelNames(), args.model)
        if args.device:
            window.modelPanel.device.setCurrentText(args.device)
        if args.server:
            window.connectServer(args.server, args.token)
        window.show()
        for volume in args.volumes[:1]:
            if not window.openVolume(volume):
                raise MedFMError(window.lastMessage)
        if args.segmentation and not window.openSegmentation(args.segmentation):
            raise MedFMError(window.lastMessage)
        if actions is None:
            return app.exec()
        Replayer(window).run(actions)
        if args.save and not window.save(args.save):
            raise MedFMError(window.lastMessage)
        if args.screenshot:
            window.screenshot(args.screenshot)
        print(window.lastMessage or "replayed")
        if not args.exit:
            return app.exec()
        return 0
    finally:
        if args.exit or actions is None or sys.exc_info()[0] is not None:
            window.unsaved = False  # saved above, or the user saw the error; never ask on the way out
            window.shutdown()
