"""`medfm evaluate`: simulated users on real datasets, scored as the field scores interactive segmentation."""
