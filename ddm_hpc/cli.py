"""Command line: ``ddm-hpc run|train|cluster|distill|attribute|evaluate|diagnose|show|status``.

Flags are generated from the config dataclasses (``--field-name``). A value is resolved, last
wins, from: built-in defaults < the run directory's saved ``config.json`` < ``--preset`` <
``--config FILE`` (YAML or JSON) < flags given on the command line. So a stage run on its own
(``ddm-hpc cluster --out R``) reuses the options the earlier stages of ``R`` were run with.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from ddm_hpc.config import PRESETS, SECTIONS, STAGES, Config, merge
from ddm_hpc.errors import DDMError

log = logging.getLogger("ddm_hpc")

STAGE_HELP = {
    "run": "run every stage (train, cluster, distill, attribute), skipping up-to-date ones",
    "train": "train the target and record its trajectory -> train.h5",
    "cluster": "k-means each class into C clusters -> clusters.h5",
    "distill": "learn a synset per cluster/class by reverse gradient matching -> synsets.h5",
    "attribute": "perturb synsets, fine-tune, fit the attribution matrix -> attribution.h5",
    "evaluate": "exact leave-cluster-out retraining, baselines and peers, LDS -> evaluation.h5 + report.md",
    "diagnose": "useless/noisy data, quick unlearning, synset privacy, transferability, pictures -> diagnostics.md",
}
# Sections whose flags each command shows (runtime and seed always).
COMMAND_SECTIONS = {
    "run": ("data", "model", "train", "cluster", "distill", "attribute"),
    "train": ("data", "model", "train"),
    "cluster": ("data", "model", "train", "cluster"),
    "distill": ("data", "model", "train", "cluster", "distill"),
    "attribute": ("data", "model", "train", "cluster", "distill", "attribute"),
    "evaluate": ("data", "model", "train", "cluster", "distill", "attribute", "evaluate"),
    "diagnose": ("data", "model", "train", "cluster", "distill", "attribute", "diagnose"),
}


def _base_type(tp: Any) -> type:
    """int | None -> int; bool stays bool."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing))  # annotations are strings under `from __future__ import annotations`
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _add_fields(parser: argparse.ArgumentParser, section: str | None, cls: type) -> None:
    group = parser.add_argument_group(section or "general")
    for f in dataclasses.fields(cls):
        if cls is Config and f.name in SECTIONS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = _base_type(f.type)
        dest = f"{section}.{f.name}" if section else f.name
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if tp is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=tp, default=argparse.SUPPRESS, help=help_text,
                               metavar=tp.__name__.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddm-hpc", description="Training-data attribution with Distilled "
                                     "Datamodels (reverse gradient matching). Artifacts are HDF5 files in --out.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd, sections in COMMAND_SECTIONS.items():
        p = sub.add_parser(cmd, help=STAGE_HELP[cmd], description=STAGE_HELP[cmd], allow_abbrev=False)
        p.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                       help="named option set: default (CPU-sized demo), paper (Table 5 scale), smoke (seconds), eval "
                       "(evaluate on CPU within the hour)")
        p.add_argument("--config", dest="config_file", default=argparse.SUPPRESS,
                       help="YAML or JSON file of options, nested by section (data:, train:, ...)")
        _add_fields(p, None, Config)
        for sec in (*sections, "runtime"):
            _add_fields(p, sec, SECTIONS[sec])
    show = sub.add_parser("show", help="print the summary of a run directory", description="print a run's summary")
    show.add_argument("run_dir", help="run directory (the --out of an earlier run)")
    show.add_argument("--n-show", type=int, default=10, help="queries to list")
    st = sub.add_parser("status", help="per-stage artifacts and shard progress, failed tasks and their logs",
                        description="per-stage artifacts and shard progress of a run, failed tasks with their log paths")
    st.add_argument("run_dir", help="run directory (the --out of a run, finished or not)")
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DDMError(f"--config {path}: no such file; pass a YAML or JSON file of options")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise DDMError(f"--config {path}: expected a mapping of sections (data:, model:, ...)")
    return data


def resolve_config(ns: argparse.Namespace) -> Config:
    """Merge defaults, saved run config, preset, config file and explicit flags."""
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "verbose", "preset", "config_file")}
    flags: dict[str, Any] = {}
    for key, val in given.items():
        if "." in key:
            sec, name = key.split(".", 1)
            flags.setdefault(sec, {})[name] = val
        else:
            flags[key] = val
    out = flags.get("runtime", {}).get("out", Config().runtime.out)
    from ddm_hpc.pipeline import load_saved_config

    merged = Config().to_dict()
    merged = merge(merged, load_saved_config(out))
    if getattr(ns, "preset", None):
        merged = merge(merged, PRESETS[ns.preset]())
    if getattr(ns, "config_file", None):
        merged = merge(merged, _read_config_file(ns.config_file))
    merged = merge(merged, flags)
    return Config.from_dict(merged)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every ISA it tries
    try:
        if ns.command == "status":
            from ddm_hpc.launch import status

            print(status(ns.run_dir))
            return 0
        if ns.command == "show":
            from ddm_hpc.pipeline import summary

            print(summary(ns.run_dir, ns.n_show))
            return 0
        cfg = resolve_config(ns)
        from ddm_hpc.pipeline import run_stages, summary

        timings = {}
        if ns.command in ("evaluate", "diagnose"):  # run missing pipeline stages first (--overwrite: not those)
            timings = run_stages(dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, overwrite=False)))
        if ns.command == "diagnose":
            import time

            from ddm_hpc.diagnose import run_diagnose

            t0 = time.perf_counter()
            print(f"wrote {run_diagnose(cfg)}")
            timings["diagnose"] = time.perf_counter() - t0
        else:
            stages = STAGES if ns.command == "run" else (ns.command,)
            timings.update(run_stages(cfg, stages))
            print(summary(cfg.runtime.out))
        if timings:
            print("this invocation: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        return 0
    except DDMError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ddm-hpc: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddm-hpc: interrupted; completed stages are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
