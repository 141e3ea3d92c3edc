"""Are two run directories the same? Every HDF5 file of OLD against NEW: datasets bit for bit, attrs equal.

For checking that a change preserves behaviour: run the same command with the old and the new code into
two directories, then

    python benchmarks/compare_runs.py OLD_RUN NEW_RUN

Left out as volatile: timings (``seconds*``), provenance that differs by construction (``uid``, ``upstream``,
``created``, ``git_revision``, ``versions``, ``device``) and hashes of them or of absolute paths
(``stage_key``, ``key``, ``job_key``); paths inside attrs are compared with each run directory's own path
(absolute or as given) replaced.
Attrs only NEW has are allowed (additions); anything else that differs is printed. Exit status 1 if any file
differs or is missing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

VOLATILE = {"uid", "upstream", "created", "git_revision", "versions", "device", "stage_key", "key", "job_key",
            "sha256"}  # sha256: the attrs checksum covers the volatile attrs too


def _volatile(name: str) -> bool:
    return name in VOLATILE or "seconds" in name


def _norm(value: object, roots: tuple[str, ...]) -> object:
    if not isinstance(value, str):
        return value
    for root in sorted(roots, key=len, reverse=True):  # the absolute path before its relative spelling
        value = value.replace(root, "RUN")
    return value


def _attrs(old: h5py.HLObject, new: h5py.HLObject, where: str, roots: tuple[str, ...]) -> list[str]:
    out = []
    for name, value in old.attrs.items():
        if _volatile(name):
            continue
        if name not in new.attrs:
            out.append(f"{where}@{name}: missing in NEW")
        elif not np.array_equal(np.asarray(_norm(value, roots)), np.asarray(_norm(new.attrs[name], roots))):
            out.append(f"{where}@{name}: {value!r} != {new.attrs[name]!r}")
    return out


def compare_file(old: Path, new: Path, roots: tuple[str, ...]) -> list[str]:
    """The differences between two HDF5 files (empty if none)."""
    out = []
    with h5py.File(old, "r", locking=False) as fo, h5py.File(new, "r", locking=False) as fn:
        items_o, items_n = {}, {}
        fo.visititems(lambda k, v: items_o.__setitem__(k, v))
        fn.visititems(lambda k, v: items_n.__setitem__(k, v))
        out += [f"{k}: only in {'NEW' if k in items_n else 'OLD'}" for k in sorted(set(items_o) ^ set(items_n))]
        for k in sorted(set(items_o) & set(items_n)):
            a, b = items_o[k], items_n[k]
            if isinstance(a, h5py.Dataset) and not _volatile(k.rpartition("/")[2]):
                x, y = a[()], b[()]
                floating = isinstance(x, np.ndarray) and x.dtype.kind == "f"
                same = np.shape(x) == np.shape(y) and (np.array_equal(x, y, equal_nan=True) if floating
                                                       else np.array_equal(np.asarray(x), np.asarray(y)))
                if not same:
                    out.append(f"{k}: values differ")
            out += _attrs(a, b, k, roots)
        out += _attrs(fo, fn, "/", roots)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args()
    roots = (str(args.old.resolve()), str(args.new.resolve()), str(args.old), str(args.new))
    files = sorted(p.relative_to(args.old) for p in args.old.rglob("*.h5") if not {"shards", ".data"} & set(p.parts))
    bad = 0
    for rel in files:
        if not (args.new / rel).exists():
            print(f"{rel}: missing in NEW")
            bad += 1
            continue
        problems = compare_file(args.old / rel, args.new / rel, roots)
        bad += bool(problems)
        for p in problems[:8]:
            print(f"{rel}: {p}")
    extra = [p for p in sorted(q.relative_to(args.new) for q in args.new.rglob("*.h5") if "shards" not in q.parts)
             if p not in files]
    print(f"{len(files)} files compared, {bad} differ; only in NEW: {[str(p) for p in extra]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
