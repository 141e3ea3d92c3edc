"""``ddm-hpc import-trajectory``: ``train.h5`` from checkpoints saved by your own training loop.

One ``state_dict`` per epoch (``torch.save(model.state_dict(), f"ckpt/epoch_{epoch}.pt")``, epoch 0 = the
weights before the first step), matched by a glob and ordered by the last number in each file name::

    ddm-hpc import-trajectory --checkpoints 'ckpt/epoch_*.pt' --model torchvision:resnet18 \\
        --dataset data.npz --n-train 0 --n-test 0 --out runs/mine

Each file is read with ``torch.load(weights_only=True)`` (``.safetensors`` files need the safetensors
package), checked against ``--model`` (keys and shapes), loaded, and its test accuracy computed on the
run's test subset. ``train.h5`` is written in the train stage's schema, buffers (BatchNorm statistics)
included, with ``--epochs`` set to the last epoch, and attr ``imported`` (the glob and file names);
``RUN/config.json`` records the options, so ``cluster``, ``distill`` and ``attribute`` run on it as on
a trained run. The model sees what every stage feeds it: pixels in [0, 1] normalised per channel by the
training subset's mean and std (train.h5 attrs ``mean``, ``std``); train on the same inputs.

``evaluate`` and the removal diagnostics retrain exactly, with ddm-hpc's recipe, which did not make
these checkpoints: they refuse an imported run unless ``--imported-recipe ddm-hpc`` states that it did
(:func:`check_retrainable`).

Room: a command (imports ``config``, ``context``, ``models``, ``storage``, ``train`` and ``trajectory``).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import pickle
import re
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import torch

from ddm_hpc.config import Config
from ddm_hpc.context import load_data
from ddm_hpc.errors import ConfigError
from ddm_hpc.models import build_target
from ddm_hpc.storage import ParamTable, artifact_path, read_attrs, write_json_atomic
from ddm_hpc.train import accuracy, write_artifact
from ddm_hpc.trajectory import Trajectory
from ddm_hpc.utils import configure_threads

log = logging.getLogger(__name__)

NESTED_KEYS = ("state_dict", "model_state_dict", "model")  # where a checkpoint dict may hold the weights


def checkpoint_files(pattern: str) -> list[tuple[int, Path]]:
    """(epoch, file) for every file ``pattern`` matches, in epoch order: epochs 0, 1, ..., E.

    Raises:
        ConfigError: nothing matches, a name holds no number, two files share an epoch, epoch 0 (theta_0) is
            missing, or an epoch in between is missing.
    """
    paths = [Path(p) for p in glob.glob(pattern) if Path(p).is_file()]
    if not paths:
        raise ConfigError(f"--checkpoints {pattern!r} matches no file: pass a glob such as 'ckpt/epoch_*.pt' (quoted)")
    found: dict[int, Path] = {}
    for p in paths:
        numbers = re.findall(r"\d+", p.name)
        if not numbers:
            raise ConfigError(f"checkpoint {p} has no epoch number in its name: name them e.g. epoch_3.pt")
        epoch = int(numbers[-1])
        if epoch in found:
            raise ConfigError(f"checkpoints {found[epoch]} and {p} both say epoch {epoch}: keep one file per epoch")
        found[epoch] = p
    epochs = sorted(found)
    if epochs[0] != 0:
        raise ConfigError(f"no checkpoint for epoch 0 among {len(epochs)} (first: {found[epochs[0]].name}): theta_0, the "
                          "weights before the first step, is required (distillation matches against theta_0..theta_tau "
                          "and the fine-tunes' step count is tau): save model.state_dict() before training as epoch_0")
    missing = sorted(set(range(epochs[-1] + 1)) - set(epochs))
    if missing:
        raise ConfigError(f"checkpoint epochs are not contiguous: {', '.join(map(str, missing[:5]))} missing between "
                          f"0 and {epochs[-1]}: save one checkpoint per epoch (or rename them 0..E in order)")
    return [(e, found[e]) for e in epochs]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in a checkpoint file (``torch.load(weights_only=True)``; ``.safetensors`` too).

    A dict holding the weights under ``state_dict``, ``model_state_dict`` or ``model`` (with an epoch or an
    optimizer beside them) is accepted; so are keys prefixed ``module.`` (DataParallel).

    Raises:
        ConfigError: the file is not a plain state_dict (a pickled module or other objects), or unreadable.
    """
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # optional: only for .safetensors checkpoints
        except ImportError:
            raise ConfigError(f"{path}: reading .safetensors needs the safetensors package, which is not installed: "
                              "pip install safetensors, or save with torch.save(model.state_dict(), ...)") from None
        obj: object = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ConfigError(f"{path} is not a plain state_dict (torch.load(weights_only=True) refuses the objects "
                              "it pickles, e.g. a whole nn.Module): save model.state_dict() instead") from None
        except (OSError, RuntimeError, EOFError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"{path} could not be read as a PyTorch checkpoint ({reason}): save it with "
                              "torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict) and not isinstance(obj.get(key), torch.Tensor):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ConfigError(f"{path} holds a {type(obj).__name__} that is not a state_dict (names -> tensors): save "
                          "model.state_dict()")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_state_dict(path: Path, sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: str) -> None:
    """Raise unless ``sd`` has exactly the keys and shapes of the model's ``state_dict`` (``expected``)."""
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing or extra:
        what = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else "") if part)
        raise ConfigError(f"{path} does not fit --model {model} ({what}): pass the --model (and --model-args) the "
                          "checkpoints were trained with")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ConfigError(f"{path}: {k} has shape {list(sd[k].shape)} but --model {model} has {list(v.shape)} "
                              "on this dataset: pass the --model (and --model-args) and --dataset the checkpoints "
                              "were trained with")


def import_trajectory(cfg: Config, pattern: str) -> Path:
    """Write ``RUN/train.h5`` (and ``RUN/config.json``) from the per-epoch checkpoints ``pattern`` matches.

    Every file is checked before anything is written; ``train.h5`` is written atomically.
    """
    t0 = time.perf_counter()
    target = artifact_path(cfg.runtime.out, "train")
    if read_attrs(target) is not None and not cfg.runtime.overwrite:
        raise ConfigError(f"{target} exists: pass --overwrite to replace it (later stages are then recomputed), or "
                          "choose another --out")
    files = checkpoint_files(pattern)
    bundle = load_data(cfg)
    configure_threads(cfg.runtime.threads)
    model = build_target(cfg, bundle)
    expected = model.state_dict()
    table, btable = ParamTable.from_module(model), ParamTable.buffers_of(model)
    rows, buffer_rows, accs = [], [], []
    for epoch, path in files:
        sd = read_state_dict(path)
        check_state_dict(path, sd, expected, cfg.model.model)
        model.load_state_dict(sd)
        rows.append(table.flatten(dict(model.named_parameters())))
        if btable.names:
            buffer_rows.append(btable.flatten(dict(model.named_buffers())))
        accs.append(accuracy(model, bundle.x_test, bundle.y_test))
        log.info("import: epoch %d from %s, test accuracy %.4f", epoch, path, accs[-1])
    tau = files[-1][0]
    if tau < 1:
        raise ConfigError(f"--checkpoints {pattern!r} holds only epoch 0: import at least theta_0 and one trained epoch")
    if accs[-1] < 1.5 / bundle.num_classes:
        log.warning("import: theta_tau's test accuracy %.3f is near chance (1/%d): were the checkpoints trained on the "
                    "inputs every stage feeds the model (pixels in [0, 1] normalised per channel by the training "
                    "subset's mean %s and std %s) and on this --dataset?", accs[-1], bundle.num_classes,
                    [round(m, 4) for m in bundle.mean], [round(s, 4) for s in bundle.std])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=tau, save_every=1))
    traj = Trajectory(table, torch.stack(rows), [e for e, _ in files], accs, [float("nan")] * len(files),
                      btable if buffer_rows else None, torch.stack(buffer_rows) if buffer_rows else None)
    out = Path(cfg.runtime.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {k: v for k, v in cfg.to_dict().items() if k != "runtime"})
    imported = json.dumps({"checkpoints": pattern, "files": [str(p) for _, p in files]})
    path = write_artifact(cfg, bundle, traj, time.perf_counter() - t0, imported=imported)
    log.info("import: %d checkpoints (epochs 0..%d) -> %s, test accuracy %.4f", len(files), tau, path, accs[-1])
    return path


def check_retrainable(cfg: Config) -> None:
    """Refuse exact retraining on an imported run, unless ``--imported-recipe ddm-hpc`` states that ddm-hpc's recipe
    made its checkpoints and theta_0 is ``--model``'s init with ``--seed`` (exact retraining starts there).

    Raises:
        ConfigError: an imported run without the statement, or a theta_0 that retraining could not reproduce.
    """
    path = artifact_path(cfg.runtime.out, "train")
    attrs = read_attrs(path)
    if not attrs or not attrs.get("imported"):
        return
    if cfg.evaluate.imported_recipe != "ddm-hpc":
        raise ConfigError(f"{path} was imported from your checkpoints, and exact retraining uses ddm-hpc's recipe "
                          "(theta_0 of --model with --seed, SGD --lr/--momentum/--weight-decay/--batch-size, its per-epoch "
                          "order), which did not make them: pass --imported-recipe ddm-hpc only if it did, else score "
                          "with attribute alone")
    with h5py.File(path, "r", locking=False) as f:
        theta_0 = torch.from_numpy(f["trajectory/params"][0])
        c, h, w = (int(v) for v in f.attrs["image_shape"])
        shape = SimpleNamespace(in_channels=c, num_classes=int(f.attrs["num_classes"]), image_size=(h, w))
    model = build_target(cfg, shape)
    ours = ParamTable.from_module(model).flatten(dict(model.named_parameters()))
    if not torch.equal(ours, theta_0):
        diff = float((ours - theta_0).abs().max()) if ours.shape == theta_0.shape else float("inf")
        raise ConfigError(f"--imported-recipe ddm-hpc: theta_0 of {path} is not --model {cfg.model.model}'s init with "
                          f"--seed {cfg.seed} (max difference {diff:.3g}), so retraining could not reproduce the run: "
                          "initialise with ddm_hpc.models.build_target, or evaluate without importing")


__all__ = ["import_trajectory", "checkpoint_files", "read_state_dict", "check_state_dict", "check_retrainable"]
