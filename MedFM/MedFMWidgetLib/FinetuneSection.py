"""The module panel's "Fine-tune" section: train a SAM-family model on the segmentations in the scene.

GUI glue only: the cases are exported and the training runs in MedFMLib.mrml.finetune (``casesFromScene``,
``FinetuneTask``, on a worker thread); this section starts it, polls its progress with a QTimer, and stops
it. Slicer loads this at start-up through MedFM.py: only Qt, ctk and Slicer at the top; MedFMLib (and
torch behind it) is imported when used.
"""

import logging

import ctk
import qt
import slicer

POLL_MILLISECONDS = 250


class FinetuneSection:
    """A collapsible section; ``storeGetter()`` gives the model store, ``deviceGetter()`` the device chosen
    in the panel, and ``onModelsChanged()`` refreshes the panel's model list when a model is registered."""

    def __init__(self, storeGetter, deviceGetter, onModelsChanged):
        self.storeGetter, self.deviceGetter, self.onModelsChanged = storeGetter, deviceGetter, onModelsChanged
        self.task = None

        self.collapsibleButton = ctk.ctkCollapsibleButton()
        self.collapsibleButton.objectName = "finetuneCollapsibleButton"
        self.collapsibleButton.text = "Fine-tune"
        self.collapsibleButton.collapsed = True
        form = qt.QFormLayout(self.collapsibleButton)

        self.segmentationsSelector = slicer.qMRMLCheckableNodeComboBox()
        self.segmentationsSelector.nodeTypes = ["vtkMRMLSegmentationNode"]
        self.segmentationsSelector.addEnabled = False
        self.segmentationsSelector.removeEnabled = False
        self.segmentationsSelector.renameEnabled = False
        self.segmentationsSelector.setMRMLScene(slicer.mrmlScene)
        self.segmentationsSelector.toolTip = (
            "The segmentations to learn from: each one, with its source volume, is one case, and each of its "
            "segments an object to segment. Whole cases are kept aside for validation."
        )
        form.addRow("Segmentations:", self.segmentationsSelector)

        self.baseModelSelector = qt.QComboBox()
        self.baseModelSelector.toolTip = "The SAM-family model to start from; download it first (Model section)."
        form.addRow("Base model:", self.baseModelSelector)

        self.nameLineEdit = qt.QLineEdit()
        self.nameLineEdit.placeholderText = "name of the new model, e.g. liver_sam"
        form.addRow("New model:", self.nameLineEdit)

        self.epochsSpinBox = qt.QSpinBox()
        self.epochsSpinBox.setRange(1, 1000)
        self.epochsSpinBox.value = 20
        self.epochsSpinBox.toolTip = "Passes over the training slices; training stops early when validation stalls."
        form.addRow("Epochs:", self.epochsSpinBox)

        self.valFractionSpinBox = qt.QDoubleSpinBox()
        self.valFractionSpinBox.setRange(0.05, 0.9)
        self.valFractionSpinBox.singleStep = 0.05
        self.valFractionSpinBox.value = 0.2
        self.valFractionSpinBox.toolTip = "The share of the segmentations kept aside to measure the validation Dice."
        form.addRow("Validation fraction:", self.valFractionSpinBox)

        buttons = qt.QHBoxLayout()
        self.trainButton = qt.QPushButton("Train")
        self.trainButton.toolTip = "Fine-tune the base model's mask decoder on the ticked segmentations."
        self.stopButton = qt.QPushButton("Stop")
        self.stopButton.toolTip = "End training after the current step; the best weights so far are saved."
        self.stopButton.enabled = False
        buttons.addWidget(self.trainButton)
        buttons.addWidget(self.stopButton)
        form.addRow(buttons)

        self.progressBar = qt.QProgressBar()
        self.progressBar.value = 0
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel("Tick two segmentations or more, name the new model, and train.")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)

        self.timer = qt.QTimer()
        self.timer.interval = POLL_MILLISECONDS
        self.timer.timeout.connect(self.poll)
        self.trainButton.clicked.connect(self.onTrain)
        self.stopButton.clicked.connect(self.onStop)
        self.collapsibleButton.contentsCollapsed.connect(lambda collapsed: collapsed or self.populateBaseModels())
        self.populateBaseModels()

    def cleanup(self):
        """The panel is going away (Slicer closes): stop the timer, and ask training to stop."""
        self.timer.stop()
        if self.task is not None and self.task.isRunning:
            self.task.stop()

    def populateBaseModels(self):
        from MedFMLib.mrml.finetune import finetuneBaseModels

        current = self.baseModelSelector.currentText
        self.baseModelSelector.clear()
        try:
            store = self.storeGetter()
            names = finetuneBaseModels(store)
            ready = [name for name in names if store.is_ready(name)]
        except Exception as error:  # a broken catalog: say so, keep the panel usable
            self.statusLabel.text = str(error)
            return
        self.baseModelSelector.addItems(ready + [name for name in names if name not in ready])
        self.baseModelSelector.currentText = current if current in names else (ready or names or [""])[0]

    def setRunning(self, running):
        for widget in (self.trainButton, self.segmentationsSelector, self.baseModelSelector, self.nameLineEdit,
                       self.epochsSpinBox, self.valFractionSpinBox):  # fmt: skip
            widget.enabled = not running
        self.stopButton.enabled = running

    def onTrain(self):
        from MedFMLib.errors import MedFMError
        from MedFMLib.mrml.finetune import FinetuneTask, casesFromScene

        try:
            with slicer.util.WaitCursor():  # the cases are copied here, on the GUI thread: the worker never sees MRML
                cases = casesFromScene(list(self.segmentationsSelector.checkedNodes()))
                self.task = FinetuneTask(
                    cases, self.baseModelSelector.currentText, self.nameLineEdit.text, self.storeGetter(),
                    epochs=self.epochsSpinBox.value, valFraction=self.valFractionSpinBox.value,
                    device=self.deviceGetter() or "auto",
                )  # fmt: skip
        except MedFMError as error:
            self.statusLabel.text = str(error)
            return
        self.task.start()
        self.setRunning(True)
        self.progressBar.value = 0
        self.statusLabel.text = "Loading the base model..."
        self.timer.start()

    def onStop(self):
        if self.task is not None:
            self.task.stop()
        self.stopButton.enabled = False

    def poll(self):
        """The timer's tick: show the worker's latest progress; when it has ended, its result or error."""
        from MedFMLib.mrml.finetune import describeProgress, describeResult

        task = self.task
        if task is None:
            self.timer.stop()
            return
        progress = task.progress()
        self.progressBar.maximum = max(progress["total"], 1)
        self.progressBar.value = min(progress["done"], self.progressBar.maximum)
        note = f" ({progress['note']})" if progress["note"] else ""
        self.statusLabel.text = describeProgress(progress) + note
        if task.isRunning:
            return
        self.timer.stop()
        self.setRunning(False)
        if task.error is not None:
            if task.errorDetails:
                logging.error(f"MedFM fine-tuning failed:\n{task.errorDetails}")
            self.progressBar.value = 0
            self.statusLabel.text = task.error
            return
        self.statusLabel.text = describeResult(task.result) + " Pick it in the Model list above."
        self.onModelsChanged()
        self.populateBaseModels()
