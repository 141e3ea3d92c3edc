"""Command line: ``ddm-hpc run|train|cluster|distill|attribute|evaluate|diagnose|import-trajectory|show|status``.

Flags are generated from the config dataclasses (``--field-name``). A value is resolved, last
wins, from: built-in defaults < the run directory's saved ``config.json`` < ``--preset`` <
``--config FILE`` (YAML or JSON) < flags given on the command line. So a stage run on its own
(``ddm-hpc cluster --out R``) reuses the options the earlier stages of ``R`` were run with.

Room: the command line, the top (imports ``config``, ``graph``, ``importer``, ``launch``, ``methods`` for the help
of ``--methods``, ``pipeline``, and ``storage`` for the one-line error of a folder that cannot take a file).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ddm_hpc import graph, methods
from ddm_hpc.config import PRESETS, SECTIONS, Config, merge
from ddm_hpc.errors import ConfigError, DDMError
from ddm_hpc.importer import import_trajectory
from ddm_hpc.launch import status
from ddm_hpc.pipeline import load_saved_config, run_command, run_lock, summary
from ddm_hpc.storage import output_error, write_errno
from ddm_hpc.utils import load_plugins

log = logging.getLogger("ddm_hpc")

REGISTRIES = {"methods": methods.describe}  # options whose help lists a registry's entries (field metadata)


def commands() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Subcommand -> (help, config sections whose flags it shows), from the stage graph (runtime and seed always)."""
    run_help = f"run every stage ({', '.join(graph.RUN)}), skipping up-to-date ones"
    out = {"run": (run_help, graph.stage(graph.RUN[-1]).sections)}
    out.update({s.name: (s.help, s.sections) for s in graph.STAGES})
    return out


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
        registry = REGISTRIES.get(str(f.metadata.get("registry", "")))
        listed = f"; registered: {registry()}" if registry else ""
        help_text = f"{f.metadata.get('help', '')}{listed} (default: {default!r})"
        if tp is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=tp, default=argparse.SUPPRESS, help=help_text,
                               metavar=tp.__name__.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddm-hpc", description="Training-data attribution with Distilled "
                                     "Datamodels (synsets matched to each cluster's influence step). Artifacts are "
                                     "HDF5 files in --out.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd, (help_text, sections) in commands().items():
        p = sub.add_parser(cmd, help=help_text, description=help_text, allow_abbrev=False)
        p.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                       help="named option set: default (CPU-sized demo), paper (Table 5 scale), smoke (seconds), eval "
                       "(evaluate on CPU within the hour)")
        p.add_argument("--config", dest="config_file", default=argparse.SUPPRESS,
                       help="YAML or JSON file of options, nested by section (data:, train:, ...)")
        _add_fields(p, None, Config)
        for sec in (*sections, "runtime"):
            _add_fields(p, sec, SECTIONS[sec])
    imp_help = "train.h5 from your own per-epoch checkpoints (state_dicts, epoch 0 = theta_0) -> train.h5"
    imp = sub.add_parser("import-trajectory", help=imp_help, description=imp_help, allow_abbrev=False)
    imp.add_argument("--checkpoints", required=True, help="glob of the checkpoint files, quoted, e.g. 'ckpt/epoch_*.pt' "
                     "(ordered by the last number in each name; torch.save(model.state_dict()) files)")
    imp.add_argument("--config", dest="config_file", default=argparse.SUPPRESS, help="YAML or JSON file of options")
    _add_fields(imp, None, Config)
    for sec in ("data", "model", "train", "runtime"):
        _add_fields(imp, sec, SECTIONS[sec])
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
    try:
        data = (yaml.safe_load(text) or {}) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        where = getattr(e, "problem_mark", None) or getattr(e, "lineno", None)
        line = f" at line {where.line + 1}" if hasattr(where, "line") else (f" at line {where}" if where else "")
        raise DDMError(f"--config {path}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}{line}: "
                       "fix the file (sections of options, e.g. 'train: {epochs: 10}')") from None
    if not isinstance(data, dict):
        raise DDMError(f"--config {path}: expected a mapping of sections (data:, model:, ...)")
    return data


def resolve_config(ns: argparse.Namespace) -> Config:
    """Merge defaults, saved run config, preset, config file and explicit flags."""
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "verbose", "preset", "config_file", "checkpoints")}
    flags: dict[str, Any] = {}
    for key, val in given.items():
        if "." in key:
            sec, name = key.split(".", 1)
            flags.setdefault(sec, {})[name] = val
        else:
            flags[key] = val
    out = flags.get("runtime", {}).get("out", Config().runtime.out)
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
            print(status(ns.run_dir))
            return 0
        if ns.command == "show":
            if not Path(ns.run_dir, "config.json").is_file():
                raise ConfigError(f"{ns.run_dir} is not a run directory (no config.json): pass the --out of an "
                                  "earlier run")
            print(summary(ns.run_dir, ns.n_show))
            return 0
        cfg = resolve_config(ns)
        load_plugins(cfg.runtime.plugins)
        if ns.command == "import-trajectory":
            with run_lock(cfg.runtime.out, ns.command):
                import_trajectory(cfg, ns.checkpoints)
            print(summary(cfg.runtime.out))
            return 0
        timings = run_command(cfg, ns.command)
        if ns.command == "diagnose":
            print(f"wrote {Path(cfg.runtime.out) / 'diagnostics.md'}")
        else:
            print(summary(cfg.runtime.out))
        if timings:
            print("this invocation: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        return 0
    except DDMError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ddm-hpc: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot take a file, met outside the artifact writers (logs, lock, mkdir)
        code = write_errno(e)
        if code is None:
            raise
        print(f"ddm-hpc: error: {output_error(_folder_of(e, ns), code)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddm-hpc: interrupted; completed stages are kept, rerun the same command to resume", file=sys.stderr)
        return 130


def _folder_of(e: OSError, ns: argparse.Namespace) -> str:
    """The folder that could not take a file: the failed path's parent (HDF5 names the path only in its message),
    else the run directory."""
    named = e.filename or next(iter(re.findall(r"name = '([^']+)'", str(e))), None)
    return str(Path(named).parent) if named else str(vars(ns).get("runtime.out") or Config().runtime.out)


if __name__ == "__main__":
    sys.exit(main())
