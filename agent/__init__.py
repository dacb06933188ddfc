"""edge-inspect agent: the inspection daemon for the edge box.

Never imports TensorFlow (nor `convert`) at module level: the edge box does not have it.
"""

__version__ = "0.1.0"
