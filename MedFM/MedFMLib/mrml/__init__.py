"""The scene side shared by the Slicer module and the desktop app: MRML bridge, logic, prompt sync."""
