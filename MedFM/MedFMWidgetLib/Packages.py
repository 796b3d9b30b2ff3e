"""Installing the packages a model needs, from Slicer: torch through the PyTorch extension, the rest by pip.

Slicer loads this at start-up through MedFM.py: only Slicer and the standard library at the top.
"""

import slicer


def ensureDependencies(engineName, askConfirmation=True):
    """Install what an engine needs, after asking; True if nothing is missing after."""
    from MedFMLib.models.dependencies import describe, install_plan, missing_requirements, pip_commands

    missing = missing_requirements(engineName)
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
        f"MedFM needs {describe(missing)} for this model. Install now? (This can take several minutes.)",
        windowTitle="MedFM",
    ):
        return False
    needsTorch, pipSpecifiers = install_plan(missing)
    if needsTorch:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(
                "MedFM needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                "restart Slicer, and try again.",
                windowTitle="MedFM",
            )
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if (
            torchLogic.installTorch(
                askConfirmation=False, torchVersionRequirement=">=2.1", torchvisionVersionRequirement=">=0.16"
            )
            is None
        ):
            return False
    if pipSpecifiers:
        with slicer.util.displayPythonShell(), slicer.util.tryWithErrorDisplay("Installing packages failed."):
            for arguments in pip_commands(missing):  # never a torch of pip's choosing over PyTorchUtils' one
                slicer.util.pip_install(arguments)
    return not missing_requirements(engineName)
