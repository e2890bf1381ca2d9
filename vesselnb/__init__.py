"""vesselnb: convert, run and analyse fine-tuned Sa2VA checkpoints for coronary vessel segmentation.

The notebooks in ``notebooks/`` are thin pages over this package; ``vesselnb run params/<run>.yaml`` executes them
headlessly with papermill into ``outputs/<run>/``.
"""

from vesselnb.errors import VesselnbError
from vesselnb.params import RunParams, load_params

__version__ = "0.1.0"
__all__ = ["RunParams", "VesselnbError", "__version__", "load_params"]
