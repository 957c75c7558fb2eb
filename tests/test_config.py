"""DGPOConfig: defaults, documentation, and early errors for every invalid value."""

import dataclasses
import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import cpu_args
from trl import GRPOConfig, TrlParser

from dgpo_trl import DGPOConfig
from dgpo_trl.config import validate_dgpo_arguments

DGPO_FIELDS = [f for f in dataclasses.fields(DGPOConfig) if f.name.startswith("dgpo_")]


def test_defaults_follow_the_paper(tmp_path):
    args = DGPOConfig(**cpu_args(tmp_path))
    assert (args.dgpo_tau, args.dgpo_kappa, args.dgpo_divergence, args.dgpo_uniform_weights) == (
        0.5,
        1.0,
        "hellinger",
        False,
    )
    assert args.beta == 0.0  # the paper drops the KL term
    assert args.dgpo_target_ess is None and args.dgpo_skip_zero_advantage is True
    assert args.dgpo_entropy == "normalized"  # Eq. 12, the gate the paper's Sections 3.3 and 4.4 write


def test_every_dgpo_field_is_documented():
    assert {f.name for f in DGPO_FIELDS} >= {
        "dgpo_tau",
        "dgpo_kappa",
        "dgpo_divergence",
        "dgpo_uniform_weights",
        "dgpo_chunk_size",
    }
    for f in DGPO_FIELDS:
        assert f.metadata.get("help"), f.name
        assert f"{f.name} (`" in DGPOConfig.__doc__, f.name


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dgpo_tau", 0.0, "dgpo_tau must be a finite number > 0"),
        ("dgpo_tau", -1.0, "dgpo_tau must be a finite number > 0"),
        ("dgpo_tau", float("inf"), "dgpo_tau must be a finite number > 0"),
        ("dgpo_tau", float("nan"), "dgpo_tau must be a finite number > 0"),
        ("dgpo_tau", "0.5", "dgpo_tau must be a finite number > 0, got '0.5' of type str"),
        ("dgpo_kappa", -0.1, "dgpo_kappa must be a finite number >= 0"),
        ("dgpo_kappa", float("nan"), "dgpo_kappa must be a finite number >= 0"),
        ("dgpo_divergence", "kl", r"dgpo_divergence must be one of \['hellinger', 'reverse_kl'\]"),
        ("dgpo_uniform_weights", "yes", r"dgpo_uniform_weights must be True or False"),
        ("dgpo_entropy", "bits", r"dgpo_entropy must be one of \['normalized', 'nats'\]"),
        ("dgpo_entropy", None, r"dgpo_entropy must be one of \['normalized', 'nats'\]"),
        ("dgpo_chunk_size", 0, "dgpo_chunk_size must be an integer >= 1"),
        ("dgpo_chunk_size", 2.5, "dgpo_chunk_size must be an integer >= 1"),
        ("dgpo_target_ess", 0.0, r"dgpo_target_ess must be None or a number in \(0, 1\)"),
        ("dgpo_target_ess", 1.0, r"dgpo_target_ess must be None or a number in \(0, 1\)"),
        ("dgpo_skip_zero_advantage", "yes", "dgpo_skip_zero_advantage must be True or False"),
        ("loss_type", "ppo", r"loss_type must be one of \['grpo', "),
    ],
)
def test_invalid_values_raise_at_construction(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        DGPOConfig(**cpu_args(tmp_path, **{field: value}))


def test_numpy_numbers_are_numbers(tmp_path):
    # e.g. values read from a numpy sweep grid or a YAML file loaded through numpy
    args = DGPOConfig(
        **cpu_args(
            tmp_path,
            dgpo_tau=np.float32(0.25),
            dgpo_kappa=np.int64(2),
            dgpo_chunk_size=np.int32(64),
            dgpo_target_ess=np.float64(0.9),
            dgpo_skip_zero_advantage=np.bool_(False),
        )
    )
    assert (args.dgpo_tau, args.dgpo_kappa, args.dgpo_chunk_size, args.dgpo_target_ess) == (0.25, 2.0, 64, 0.9)
    # stored as plain Python values, so the arguments serialize as TrainingArguments does
    assert [
        type(v) for v in (args.dgpo_tau, args.dgpo_kappa, args.dgpo_chunk_size, args.dgpo_skip_zero_advantage)
    ] == [float, float, int, bool]
    assert json.loads(args.to_json_string())["dgpo_tau"] == 0.25
    # a plain GRPOConfig carrying numpy values (set by a pipeline) gets the same reading
    grpo = GRPOConfig(**cpu_args(tmp_path))
    grpo.dgpo_tau = np.float32(0.5)
    assert validate_dgpo_arguments(grpo).tau == 0.5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dgpo_tau", np.float32(-1.0), r"dgpo_tau must be a finite number > 0, got np.float32\(-1.0\)"),
        ("dgpo_tau", torch.tensor(0.5), r"dgpo_tau must be a finite number > 0, got tensor\(0.5000\) of type Tensor"),
        ("dgpo_tau", True, "dgpo_tau must be a finite number > 0, got True"),
        ("dgpo_chunk_size", np.float64(64.0), r"dgpo_chunk_size must be an integer >= 1, got np.float64\(64.0\)"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_its_type(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        DGPOConfig(**cpu_args(tmp_path, **{field: value}))


def test_sequence_level_importance_sampling_that_cancels_the_weights_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="importance_sampling_level='sequence'.*cancels"):
        DGPOConfig(**cpu_args(tmp_path, importance_sampling_level="sequence", loss_type="dapo"))
    # token-gradient losses and the uniform switch keep working at the sequence level
    DGPOConfig(**cpu_args(tmp_path, importance_sampling_level="sequence", loss_type="vespo"))
    DGPOConfig(
        **cpu_args(tmp_path, importance_sampling_level="sequence", loss_type="luspo", dgpo_uniform_weights=True)
    )


def test_beta_above_zero_warns_but_works(tmp_path):
    with pytest.warns(UserWarning, match="beta=0.04 adds TRL's KL penalty") as record:
        args = DGPOConfig(**cpu_args(tmp_path, beta=0.04))
    assert args.beta == 0.04
    # The warning points at the user's line (this file), not at DGPO's code or the dataclass __init__
    assert [w.filename for w in record if "KL penalty" in str(w.message)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        DGPOConfig(**cpu_args(tmp_path, beta=0.04, dgpo_uniform_weights=True))


def test_a_plain_grpo_config_gets_dgpo_defaults_and_checks(tmp_path):
    settings = validate_dgpo_arguments(GRPOConfig(**cpu_args(tmp_path)))
    assert (settings.tau, settings.kappa, settings.divergence) == (0.5, 1.0, "hellinger")
    with pytest.raises(ValueError, match="cancels"):
        validate_dgpo_arguments(GRPOConfig(**cpu_args(tmp_path, importance_sampling_level="sequence")))


def test_warning_from_a_plain_grpo_config_points_at_the_trainer_call(tiny_model_path, tmp_path):
    from dgpo_trl import DGPOTrainer
    from dgpo_trl.tasks import exact_match_reward, reversal_dataset

    args = GRPOConfig(**cpu_args(tmp_path, beta=0.04))
    with pytest.warns(UserWarning, match="beta=0.04 adds TRL's KL penalty") as record:
        DGPOTrainer(tiny_model_path, exact_match_reward, args=args, train_dataset=reversal_dataset(8))
    assert {w.filename for w in record if "KL penalty" in str(w.message)} == {__file__}


def test_cli_parses_dgpo_fields(tmp_path):
    parser = TrlParser(DGPOConfig)
    (args,) = parser.parse_args_and_config(
        [
            "--output_dir",
            str(tmp_path),
            "--bf16",
            "false",
            "--dgpo_tau",
            "0.7",
            "--dgpo_kappa",
            "0",
            "--dgpo_divergence",
            "reverse_kl",
            "--dgpo_target_ess",
            "0.8",
            "--dgpo_entropy",
            "nats",
        ]
    )
    assert (args.dgpo_tau, args.dgpo_kappa, args.dgpo_divergence, args.dgpo_target_ess) == (
        0.7,
        0.0,
        "reverse_kl",
        0.8,
    )
    assert args.dgpo_entropy == "nats"
    with pytest.raises(SystemExit):  # argparse rejects an unknown divergence before the dataclass is built
        parser.parse_args_and_config(["--output_dir", str(tmp_path), "--dgpo_divergence", "forward_kl"])


def _import_with_trl_version(tmp_path, trl_version):
    """`import dgpo_trl` in a fresh interpreter that sees `trl` at `trl_version` (a metadata-only distribution
    placed before the real one on sys.path)."""
    import subprocess
    import sys

    dist_info = tmp_path / f"trl-{trl_version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: trl\nVersion: {trl_version}\n")
    code = "import importlib.metadata as m, dgpo_trl; print(m.version('trl'))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("trl_version", ["1.17.0", "1.15.2", "2.0.0.dev0"])
def test_importing_with_another_trl_release_fails_clearly(tmp_path, trl_version):
    result = _import_with_trl_version(tmp_path, trl_version)
    assert result.returncode != 0
    assert "dgpo-trl supports trl 1.16.x" in result.stderr and f"trl {trl_version} is installed" in result.stderr
    assert 'pip install "trl>=1.16.0,<1.17"' in result.stderr


def test_the_supported_trl_release_matches_the_package_metadata(tmp_path):
    from pathlib import Path

    import dgpo_trl

    assert f'"{dgpo_trl.TRL_REQUIREMENT}"' in (Path(__file__).parents[1] / "pyproject.toml").read_text()
    result = _import_with_trl_version(tmp_path, "1.16.3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1.16.3"  # the stand-in was the distribution checked


def test_the_sequence_level_refusal_suggests_what_trl_does_not_warn_about(
    tiny_model_path, reversal_train_dataset, tmp_path, caplog
):
    """The refusal used to suggest cispo/vespo at sequence level, which TRL then warns against; what it suggests now
    builds a trainer without a warning from TRL."""
    import logging

    from dgpo_trl import DGPOTrainer
    from dgpo_trl.tasks import exact_match_reward

    with pytest.raises(ValueError) as refused:
        DGPOConfig(**cpu_args(tmp_path, importance_sampling_level="sequence", loss_type="grpo"))
    message = str(refused.value)
    assert "cispo" not in message and "vespo" not in message
    assert "importance_sampling_level='token'" in message and "loss_type='grpo'" in message
    with caplog.at_level(logging.WARNING, logger="trl"):
        DGPOTrainer(
            tiny_model_path,
            exact_match_reward,
            train_dataset=reversal_train_dataset,
            args=DGPOConfig(**cpu_args(tmp_path, importance_sampling_level="token", loss_type="grpo")),
        )
    assert not [r for r in caplog.records if r.name.startswith("trl") and r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("value", "field", "expected"), [
    ("reverse_kl", "dgpo_divergence", "reverse_kl"), ("hellinger", "dgpo_divergence", "hellinger"),
    ("uniform", "dgpo_uniform_weights", True),
])  # fmt: skip
def test_dgpo_score_is_a_deprecated_alias_that_warns_once(tmp_path, value, field, expected):
    with pytest.warns(FutureWarning, match=f"dgpo_score is deprecated.*use {field}") as record:
        args = DGPOConfig(**cpu_args(tmp_path, dgpo_score=value))
    assert getattr(args, field) == expected and args.dgpo_score is None
    assert len([w for w in record if "dgpo_score" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        validate_dgpo_arguments(args)  # used at every step: no warning again
    with pytest.raises(ValueError, match="dgpo_score .*must be one of \\['hellinger', 'reverse_kl', 'uniform'\\]"):
        DGPOConfig(**cpu_args(tmp_path, dgpo_score="kl"))


@pytest.mark.filterwarnings("ignore:dgpo_score is deprecated")
def test_a_config_with_the_deprecated_dgpo_score_trains_as_before(warm_model_path, reversal_train_dataset, tmp_path):
    from dgpo_trl import DGPOTrainer
    from dgpo_trl.tasks import exact_match_reward

    logged = {}
    for name, fields in {"old": {"dgpo_score": "reverse_kl"}, "new": {"dgpo_divergence": "reverse_kl"}}.items():
        trainer = DGPOTrainer(warm_model_path, exact_match_reward, train_dataset=reversal_train_dataset,
                              args=DGPOConfig(**cpu_args(tmp_path / name, max_steps=2, **fields)))  # fmt: skip
        trainer.train()
        logged[name] = [(row.get("loss"), row.get("dgpo/divergence/mean"), row.get("dgpo/reverse_kl/mean"))
                        for row in trainer.state.log_history if "dgpo/divergence/mean" in row]  # fmt: skip
    assert logged["old"] == logged["new"] and len(logged["old"]) == 2
    assert all(divergence == reverse_kl for _, divergence, reverse_kl in logged["old"])  # d_t is the reverse KL
