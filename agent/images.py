"""The image file extensions edge-inspect reads: a folder camera source, the line simulator and
the training folders (convert/data.py) all take the same files. Lower case, with the dot."""

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp"})
