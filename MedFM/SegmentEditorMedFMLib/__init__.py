"""The MedFM Segment Editor effect (loaded by Slicer's Segment Editor, registered by the MedFM module)."""
