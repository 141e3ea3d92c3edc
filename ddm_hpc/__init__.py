"""ddm_hpc: training-data attribution with Distilled Datamodels (DDM).

The stages, in the order of the stage graph (``graph``, one table): ``train`` (the trajectory) ->
``cluster`` -> ``distill`` (synsets matched to each cluster's influence step, or by reverse gradient matching)
-> ``attribute`` (perturb, fine-tune, WLS), then, outside ``ddm-hpc run``, ``evaluate`` (exact retraining, every
method of the ``methods`` registry) and ``diagnose``. Each module's docstring ends with its "Room": what it
imports. Bottom up:

  leaves       ``errors``, ``utils``, ``graph``
  options      ``config``
  files        ``storage`` (every HDF5 artifact), ``trajectory``, ``synsets``
  inputs       ``data`` (sources, in-memory and mapped sets, the minibatch reader), ``models``
  context      ``context`` (a run directory, its data and device), ``variants`` (derived runs, declared)
  shared steps ``features``, ``unlearn`` (the one unlearner), ``metrics``, ``retrain`` (exact retraining)
  jobs         ``launch`` (executors, shards, SLURM)
  stages       ``train``, ``cluster``, ``distill``, ``attribute``, ``evaluate``, ``diagnose``; with ``methods``
               and ``report`` for evaluate
  top          ``pipeline`` (runs stages, makes variants), ``cli``

Room: the package (imports ``errors``, for its public exceptions).
"""
from ddm_hpc.errors import ConfigError, DataError, DDMError, StageError

__version__ = "0.1.0"
__all__ = ["DDMError", "DataError", "ConfigError", "StageError", "__version__"]
