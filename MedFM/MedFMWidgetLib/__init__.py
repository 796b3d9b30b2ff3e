"""GUI glue of the MedFM module's panel that does not fit in MedFM.py (Slicer treats every .py file next to
MedFM.py as a module of its own, so helpers live in this package)."""
