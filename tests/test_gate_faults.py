"""The promotion gate when a run went wrong, against a real ``mlflow server`` (tests/mlflow_server.py).

- A version registered whose gate never ran (``promote`` killed or failed after ``register``) is
  not "nothing new": detection names the pending gate and the exact command that runs it, and
  after the gate ran the release is done (docs/operations.md, "When a step fails").
- A speed measurement the evaluate step did not trust (``metric.speedup.reliable`` = 0) is not
  promoted on, and the decision says why (docs/method.md, Stage 6).
"""

from __future__ import annotations

import json
import shlex

import pytest

from e3prune import releases
from e3prune.cli import build_parser, config_from_flags
from e3prune.cli import main as cli_main
from e3prune.detect import detect_release
from e3prune.gate import DECISION_TAG, REASONS_TAG, PromoteConfig, gate_pending, promote, promote_command
from e3prune.registry import SOURCE_TAG, RegisterConfig, register
from e3prune.report import SPEED_REASON_TAG, flat_metrics, speed_tags
from e3prune.run_config import RunConfig

SOURCE = "builtin:reference"
RATIO = 0.25
GOOD = {"student.perplexity": 40.0, "student.perplexity_ratio": 1.2, "speedup.prefill": 1.3}


def _settings(mlflow, **overrides) -> RunConfig:
    return RunConfig.parse(
        source_model=SOURCE, remove_ratio=RATIO, registered_model_name=mlflow.model_name, **overrides
    )


def _register(mlflow, run_key: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> str:
    """A version as ``register`` leaves it: release tags, metrics, alias challenger; no gate run."""
    release = releases.newest_release(SOURCE)
    cfg = RegisterConfig.parse(
        model_name=mlflow.model_name,
        model_uri=f"s3://models/{mlflow.model_name}/{run_key}",
        run_key=run_key,
        release_tags=releases.release_tags(release, RATIO),
    )
    return register(cfg, metrics=metrics, tags={SOURCE_TAG: SOURCE, **(tags or {})})["version"]


# --------------------------------------------------------------------------- a gate that never ran


def test_a_version_whose_gate_never_ran_is_reported_and_gated_once(mlflow):
    version = _register(mlflow, "killed-before-promote", GOOD)
    assert DECISION_TAG not in mlflow.client().get_model_version(mlflow.model_name, version).tags

    found = detect_release(_settings(mlflow))
    assert not found.is_new and found.existing_version == version  # not compressed again
    assert found.pending_gate_version == version and found.action == "gate"
    assert "skip: nothing new" not in found.plan
    assert f"registered as version {version} but its gate never ran" in found.plan
    assert f"`e3prune promote --model-name {mlflow.model_name} --version {version}`" in found.plan

    result = gate_pending(found)  # the gate alone, with the run's thresholds
    assert result["promoted"] and result["version"] == version
    assert mlflow.client().get_model_version(mlflow.model_name, version).tags[DECISION_TAG] == "promoted"

    after = detect_release(_settings(mlflow))
    assert after.pending_gate_version == "" and after.action == "skip" and "skip: nothing new" in after.plan
    assert gate_pending(after) is None


def test_the_command_the_plan_names_runs_the_gate(mlflow):
    version = _register(mlflow, "failed-promote", {**GOOD, "student.perplexity_ratio": 1.7})
    found = detect_release(_settings(mlflow, gate_max_perplexity_ratio=1.8))
    command = promote_command(PromoteConfig.parse({**found.steps["gate"], "model_name": mlflow.model_name}))
    assert "--max-perplexity-ratio 1.8" in command  # the run's own threshold, not the default 1.5
    line = next(x for x in found.plan.splitlines() if "The gate runs now" in x)
    words = shlex.split(line.split("`")[1])
    assert words[:2] == ["e3prune", "promote"] and "--max-perplexity-ratio" in words
    assert cli_main(words[1:]) == 0  # promoted under the run's threshold
    assert mlflow.client().get_model_version_by_alias(mlflow.model_name, "champion").version == version
    assert detect_release(_settings(mlflow)).action == "skip"


def test_a_rejected_version_is_done_and_force_recompresses(mlflow):
    version = _register(mlflow, "rejected", {**GOOD, "student.perplexity_ratio": 9.0})
    assert promote(PromoteConfig.parse(model_name=mlflow.model_name, version=version))["promoted"] is False
    assert detect_release(_settings(mlflow)).action == "skip"  # a rejection is an answer

    forced = detect_release(_settings(mlflow, force=True))
    assert forced.is_new and forced.pending_gate_version == "" and "compress (forced)" in forced.plan

    # A pending gate and force: the release is compressed again (register reuses the version).
    mlflow.client().delete_model_version_tag(mlflow.model_name, version, DECISION_TAG)
    assert detect_release(_settings(mlflow)).pending_gate_version == version
    forced = detect_release(_settings(mlflow, force=True))
    assert forced.is_new and forced.pending_gate_version == "" and forced.action == "compress"
    assert "compress (forced)" in forced.plan


def test_promote_command_round_trips_through_the_cli():
    cfg = PromoteConfig.parse(
        model_name="qwen3-8b-e3",
        version="7",
        tracking_uri="http://mlflow:5000",
        min_speedup=1.2,
        require_better_than_champion=False,
        lm_eval_min={"lm_eval.python_stdlib_cloze.student.acc": 0.4},
    )
    command = promote_command(cfg)
    assert command == (
        "e3prune promote --model-name qwen3-8b-e3 --version 7 --tracking-uri http://mlflow:5000 --min-speedup 1.2 "
        "--lm-eval-min lm_eval.python_stdlib_cloze.student.acc=0.4 --no-require-better-than-champion"
    )
    args = build_parser().parse_args(shlex.split(command)[1:])
    args.lm_eval_min = dict(args.lm_eval_min)
    assert config_from_flags(PromoteConfig, args) == cfg
    default = PromoteConfig.parse(model_name="m", version="3")
    assert promote_command(default) == "e3prune promote --model-name m --version 3"


# --------------------------------------------------------------------------- an unreliable speed


def _evaluation(reliable: bool, reason: str | None) -> dict:
    """The parts of an evaluate step's ``metrics.json`` that the registry reads."""
    speed = {
        "models": {"teacher": {}, "student": {}},
        "speedup": {"student": {"prefill": 11.7, "decode": 0.42}},
        "relative_spread": {"teacher": {"prefill": 0.9, "decode": 0.2}, "student": {"prefill": 0.1, "decode": 1.4}},
        "remeasured": True,
        "reliable": reliable,
        "unreliable_reason": reason,
    }
    models = {"student": {"perplexity": 40.0}}
    return {"models": models, "comparisons": {"student": {"perplexity_ratio": 1.2}}, "speed": speed, "lm_eval": {}}


def test_the_gate_rejects_an_unreliable_speedup_naming_why(mlflow):
    reason = "student prefill speedup 11.70× is outside the physical bound [0.65, 1.53]× of 24 → 18 layers"
    metrics = _evaluation(reliable=False, reason=reason)
    flat = flat_metrics(metrics)
    assert flat["speedup.reliable"] == 0.0 and flat["speedup.prefill"] == 11.7
    assert flat["student.decode_relative_spread"] == 1.4
    version = _register(mlflow, "contended", flat, tags=speed_tags(metrics))

    result = promote(PromoteConfig.parse(model_name=mlflow.model_name, version=version))
    assert result["promoted"] is False
    assert f"prefill speedup unreliable: {reason}" in result["reasons"]
    failed = [c for c in result["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == ["prefill speedup reliable"]  # 11.7 ≥ 1.0 passed on its own
    assert f"- prefill speedup unreliable: {reason}" in result["summary_markdown"]
    tags = mlflow.client().get_model_version(mlflow.model_name, version).tags
    assert tags[DECISION_TAG] == "rejected" and tags[SPEED_REASON_TAG] == reason
    assert f"prefill speedup unreliable: {reason}" in json.loads(tags[REASONS_TAG])


@pytest.mark.parametrize(("flag", "says"), [(1.0, "within the layer bound"), (None, "not checked")])
def test_a_reliable_or_unrecorded_speed_passes(mlflow, flag, says):
    """1.0: trusted; no flag: a version registered before the flag was recorded keeps its speedup."""
    metrics = {**GOOD, **({"speedup.reliable": flag} if flag is not None else {})}
    version = _register(mlflow, f"speed-{flag}", metrics)
    result = promote(PromoteConfig.parse(model_name=mlflow.model_name, version=version))
    assert result["promoted"] is True
    (check,) = [c for c in result["checks"] if c["check"] == "prefill speedup reliable"]
    assert check["passed"] and says in check["detail"]


def test_a_zero_flag_without_its_reason_tag_still_rejects(mlflow):
    version = _register(mlflow, "no-reason", {**GOOD, "speedup.reliable": 0.0})
    result = promote(PromoteConfig.parse(model_name=mlflow.model_name, version=version))
    assert not result["promoted"]
    assert "prefill speedup unreliable: metric speedup.reliable is 0 on the version" in result["reasons"]
