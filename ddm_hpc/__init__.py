"""ddm_hpc: training-data attribution with Distilled Datamodels (DDM).

Stages (one module each): ``data`` -> ``train`` (trajectory) -> ``cluster`` ->
``distill`` (reverse gradient matching) -> ``attribute`` (perturb, fine-tune, WLS).
``storage`` owns every HDF5 artifact, ``launch`` the executors, ``cli`` the command line.
"""
from ddm_hpc.errors import ConfigError, DataError, DDMError, StageError

__version__ = "0.1.0"
__all__ = ["DDMError", "DataError", "ConfigError", "StageError", "__version__"]
