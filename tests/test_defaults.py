"""The default DDM is influence matching with Fisher-square-root tensor weights (issue 18); runs made with the
former defaults stay valid.

The hashes below are the stage keys the code before the switch to influence matching (commit cf8f195) computed for
its default run, its ``--preset paper`` run and the pair-matching variants of its default run, and the keys the code
before the switch to ``--tensor-weights fisher-sqrt`` (commit 351515e) computed for its default run (unweighted
influence matching). A run directory holds these keys, so any change to them would turn every such run stale.
"""
from __future__ import annotations

import json

import pytest

from ddm_hpc.attribute import check
from ddm_hpc.config import PAIRS_DISTILL, PRESETS, Config, DistillConfig, complete_saved, merge
from ddm_hpc.errors import ConfigError
from ddm_hpc.methods.base import REGISTRY as METHODS
from ddm_hpc.methods.ddm import dist1_rule
from ddm_hpc.variants import (FISHER_SQRT_WEIGHTED, ONE_STEP_VARIANTS, fisher_sqrt_weighted_influence,
                              forward_matching, influence_matching, learned_labels, paper_method)

# stage keys computed by cf8f195 (before the switch)
FORMER_DEFAULT = {"distill": "efc3b67ee3370776", "attribute": "939a4673992eafc4"}
FORMER_PAPER = {"distill": "9b96cc071062ac86", "attribute": "fff7df4e6cf6415f"}
FORMER_VARIANTS = {"variants/ddm-paper": ("5a527a9234b811fb", "4bd5fe153bbcc785"),
                   "variants/ddm-match": ("455c136a4482c302", "c6a12a5d6348fe40"),
                   "variants/ddm-soft": ("3760d31d899fd45d", "f08ad43e162b8e09"),
                   "variants/ddm-inf": ("039361764dc849bc", "56352abb25194636")}
# stage keys computed by 351515e (the default was --target influence with --tensor-weights none)
FORMER_INFLUENCE_DEFAULT = {"distill": "c8e0248b08645cfb", "attribute": "fb2e763039e903e3"}
ONE_STEP_KEYS = {"ddm-disp": ("b3ca0af331439125", "54a107bb86e4179d"),
                 "ddm-inf": FORMER_VARIANTS["variants/ddm-inf"],
                 "ddm-fw": ("14d60036630ee014", "9ae45a34cb2f6ced"),
                 "ddm-fws": ("8e51779674f7d2a1", "662763bc0eab9d89")}


def former_default() -> dict:
    """The former default run's saved config: trajectory pairs, hard labels, ipc 1, matched tau-step fine-tune."""
    return merge(Config().to_dict(), {"distill": PAIRS_DISTILL, "attribute": {"finetune_scale": "matched"}})


def test_the_default_ddm_is_fisher_sqrt_weighted_influence_matching_removed_by_one_step():
    cfg = Config()
    d = cfg.distill
    for name, value in FISHER_SQRT_WEIGHTED.items():
        assert getattr(d, name) == value, name
    assert d.tensor_weights == "fisher-sqrt"
    assert (cfg.finetune_weighting, cfg.finetune_step_count(15)) == ("uniform", 1)
    check(cfg)  # a consistent set of options
    assert dist1_rule(cfg) == "dist1"  # influence synsets locate Dist1 by their own Dist1 scores
    assert dist1_rule(Config.from_dict({"distill": {"target": "displacement", "tensor_weights": "none"}})) == "dist2"
    # the ddm-fws variant of a default run distils the default run's cluster synsets; ddm-inf leaves out the weights
    assert fisher_sqrt_weighted_influence().config(cfg).distill == DistillConfig(levels="cluster")
    assert influence_matching().config(cfg).distill == DistillConfig(levels="cluster", tensor_weights="none")


def test_trajectory_pairs_keep_their_own_fine_tune():
    pairs = Config.from_dict({"distill": {**PAIRS_DISTILL}})
    assert (pairs.finetune_weighting, pairs.finetune_step_count(15)) == ("matched", 15)
    assert dist1_rule(pairs) == "dist1"
    explicit = Config.from_dict({"distill": {**PAIRS_DISTILL}, "attribute": {"finetune_scale": "uniform",
                                                                             "finetune_steps": 3}})
    assert (explicit.finetune_weighting, explicit.finetune_step_count(15)) == ("uniform", 3)
    with pytest.raises(ConfigError, match="one unweighted fine-tune step.*--finetune-scale matched"):
        check(Config.from_dict({"attribute": {"finetune_scale": "matched"}}))
    with pytest.raises(ConfigError, match="--finetune-steps 3"):
        check(Config.from_dict({"attribute": {"finetune_steps": 3}}))


def test_runs_made_with_the_former_defaults_keep_their_stage_keys(tmp_path):
    old = Config.from_dict(former_default())
    assert {s: old.stage_key(s) for s in FORMER_DEFAULT} == FORMER_DEFAULT
    paper = Config.from_dict(merge(Config().to_dict(), PRESETS["paper"]()))
    assert {s: paper.stage_key(s) for s in FORMER_PAPER} == FORMER_PAPER
    # the pair-matching variants pin their options: the same keys below the former and the new default run
    for root in (old, Config()):
        for v in (paper_method(), forward_matching(), learned_labels()):
            vc = v.config(root)
            assert (vc.stage_key("distill"), vc.stage_key("attribute")) == FORMER_VARIANTS[v.path], v.path
    vc = influence_matching().config(old)
    assert (vc.stage_key("distill"), vc.stage_key("attribute")) == FORMER_VARIANTS["variants/ddm-inf"]
    # the one-step variants pin their tensor weights: the same keys below the unweighted and the weighted default
    unweighted = Config.from_dict(merge(Config().to_dict(), {"distill": {"tensor_weights": "none"}}))
    assert {s: unweighted.stage_key(s) for s in FORMER_INFLUENCE_DEFAULT} == FORMER_INFLUENCE_DEFAULT
    assert {s: Config().stage_key(s) for s in FORMER_INFLUENCE_DEFAULT} != FORMER_INFLUENCE_DEFAULT
    for root in (unweighted, Config()):
        for name, (_, make) in ONE_STEP_VARIANTS.items():
            vc = make().config(root)
            assert (vc.stage_key("distill"), vc.stage_key("attribute")) == ONE_STEP_KEYS[name], name
    for name, (settings, make) in ONE_STEP_VARIANTS.items():  # each method row reads the variant of its name
        v = METHODS[name].variant()
        assert v == make() and v.path == f"variants/{name}", name
        assert {k: v.config(Config()).to_dict()["distill"][k] for k in settings} == settings, name

    # a run saved before --target, --optimizer and --layer-rates existed ran pairs, SGD, no per-tensor rates
    saved = former_default()
    for name in ("target", "optimizer", "layer_rates", "contraction", "augment", "damping"):
        del saved["distill"][name]
    completed = complete_saved(saved)
    assert (completed["distill"]["target"], completed["distill"]["optimizer"],
            completed["distill"]["layer_rates"]) == ("pairs", "sgd", False)
    from_cli = _resolved_through_cli(tmp_path, saved)
    assert from_cli.distill.target == "pairs" and from_cli.stage_key("distill") == FORMER_DEFAULT["distill"]

    # a run saved before --tensor-weights existed weighed every tensor the same
    saved = unweighted.to_dict()
    del saved["distill"]["tensor_weights"]
    assert complete_saved(saved)["distill"]["tensor_weights"] == "none"
    (tmp_path / "influence").mkdir()
    from_cli = _resolved_through_cli(tmp_path / "influence", saved)
    assert from_cli.distill.tensor_weights == "none"
    assert {s: from_cli.stage_key(s) for s in FORMER_INFLUENCE_DEFAULT} == FORMER_INFLUENCE_DEFAULT


def _resolved_through_cli(tmp_path, saved: dict) -> Config:
    """The config ``ddm-hpc run --out RUN`` resolves for a run directory holding ``saved``."""
    from ddm_hpc.cli import build_parser, resolve_config
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "runtime"}))
    return resolve_config(build_parser().parse_args(["run", "--out", str(out)]))


def test_switching_to_pairs_is_refused_in_one_line_naming_every_flag():
    with pytest.raises(ConfigError, match=r"--method ddm-match: pass --method ddm, or --target pairs "
                                          r"--no-layer-rates --tensor-weights none \(or --preset paper\)"):
        DistillConfig(method="ddm-match")
    with pytest.raises(ConfigError, match="pass --target pairs --no-layer-rates --tensor-weights none --contraction 0"):
        DistillConfig(augment="dsa", contraction=1)
    with pytest.raises(ConfigError, match="or --no-layer-rates --tensor-weights none$"):
        DistillConfig(target="pairs")
    with pytest.raises(ConfigError, match=r"--tensor-weights fisher-sqrt \(the default\) reads the Fisher .* or "
                                          r"--tensor-weights none$"):
        DistillConfig(target="displacement")
    DistillConfig(**PAIRS_DISTILL, method="ddm-match")  # what the refusal names is enough
    DistillConfig(target="pairs", layer_rates=False, tensor_weights="none", augment="dsa")
    DistillConfig(target="displacement", tensor_weights="none")


def test_diagnose_ranks_with_learned_labels_only_where_the_run_has_none():
    """``diagnose``'s extra learned-label ranking (``variants/ddm-soft``) is made for hard-label runs only: the
    default synsets have learned labels already."""
    from ddm_hpc.diagnose.removal import soft_variant
    assert soft_variant(Config()) is None
    hard = Config.from_dict({"distill": PAIRS_DISTILL})
    assert soft_variant(hard).path == "variants/ddm-soft" == learned_labels().path
    assert soft_variant(Config.from_dict({"distill": PAIRS_DISTILL, "diagnose": {"learned_labels": False}})) is None
