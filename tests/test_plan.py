"""``e3prune plan``: sizes from config.json alone (docs/operations.md, "Running 8B / 32B / 70B")."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from e3prune.cli import main
from e3prune.errors import E3PruneError
from e3prune.plan import GPU_TYPES, STEPS, PlanConfig, model_shape, plan, render

CONFIGS = Path(__file__).parent / "data" / "configs"


@pytest.mark.parametrize(
    ("name", "billions", "layers"), [("qwen3-8b", 8.19, 36), ("qwen3-32b", 32.76, 64), ("llama-3.1-70b", 70.55, 80)]
)
def test_the_committed_configs_load_and_count(name, billions, layers):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(CONFIGS / name)
    assert config.num_hidden_layers == layers and config.tie_word_embeddings is False
    shape = model_shape(CONFIGS / name)
    assert shape.params / 1e9 == pytest.approx(billions, abs=0.01)
    assert len(set(shape.per_layer)) == 1 and shape.params == sum(shape.per_layer) + 2 * shape.vocab * shape.hidden + (
        shape.hidden
    )


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_qwen3_32b_fits_one_node_of_h100_and_every_step_is_planned():
    cfg = PlanConfig.parse(model=str(CONFIGS / "qwen3-32b"), distill_tokens=500_000_000, distill_batch_size=2)
    result = plan(cfg)
    assert [s["step"] for s in result["steps"]] == list(STEPS)
    usable = GPU_TYPES["H100-80GB"].memory_gib * 0.9
    for step in result["steps"]:
        assert step["memory_gib"] > 0
        if step["where"] == "gpu":
            assert step["memory_gib"] <= usable and step["gpus_per_node"] <= 8 and step["seconds"] > 0
    distill = next(s for s in result["steps"] if s["step"] == "distill")
    assert distill["flops"] == pytest.approx(6 * result["student_parameters"] * 500_000_000)
    assert result["student_parameters"] < result["parameters"] and result["removed_layers"] == 16
    assert result["teacher_cache_bytes"] == 68 * (647_168 + 524_288)  # the default search and distill splits
    text = render(result)
    for step in STEPS:
        assert f"| {step} |" in text


def test_70b_on_one_a100_40gb_is_refused_naming_the_field():
    cfg = PlanConfig.parse(model=str(CONFIGS / "llama-3.1-70b"), gpu_type="A100-40GB", gpus=1)
    with pytest.raises(E3PruneError) as info:
        plan(cfg)
    assert info.value.field in ("gpus", "gpu_type", "nodes")
    assert "distill" in str(info.value) and "A100-40GB" in str(info.value)


def test_70b_distill_on_two_h100_nodes_needs_a_smaller_micro_batch():
    base = dict(model=str(CONFIGS / "llama-3.1-70b"), nodes=2, distill_tokens=500_000_000)
    with pytest.raises(E3PruneError) as info:
        plan(PlanConfig.parse(**base, distill_batch_size=8))
    assert info.value.field == "nodes" and "distill_batch_size" in str(info.value)
    fits = plan(PlanConfig.parse(**base, distill_batch_size=1))
    assert next(s for s in fits["steps"] if s["step"] == "distill")["nodes"] == 2


def test_cli_prints_the_table_and_json():
    code, out, _ = _run("plan", str(CONFIGS / "qwen3-8b"), "--distill-tokens", "500000000")
    assert code == 0 and "| distill |" in out and "teacher cache" in out and "MFU 40%" in out
    code, out, _ = _run("plan", str(CONFIGS / "qwen3-8b"), "--json", "--gpu-type", "H200-141GB", "--gpus", "2")
    result = json.loads(out)
    assert code == 0 and result["gpu"]["type"] == "H200-141GB" and len(result["steps"]) == len(STEPS)
    code, out, err = _run("plan", str(CONFIGS / "llama-3.1-70b"), "--gpus", "1", "--gpu-type", "A100-40GB")
    assert code == 2 and err.startswith("error: gpu") and out == ""


def test_a_bad_gpu_type_lists_the_allowed_ones():
    code, _, err = _run("plan", str(CONFIGS / "qwen3-8b"), "--gpu-type", "B200")
    assert code == 2 and err.startswith("error: gpu_type: unknown GPU type 'B200'")
    for name in GPU_TYPES:
        assert name in err


def test_plan_reads_no_weights(tmp_path):
    """A directory with config.json only (no weights, no tokenizer) is planned; so is the file itself."""
    shutil.copy(CONFIGS / "qwen3-8b" / "config.json", tmp_path / "config.json")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    code, out, _ = _run("plan", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["parameters"] == model_shape(CONFIGS / "qwen3-8b").params
    code, out, _ = _run("plan", str(tmp_path / "config.json"), "--device", "cpu", "--json")
    assert code == 0 and all(s["where"] == "cpu" for s in json.loads(out)["steps"])
    code, _, err = _run("plan", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("error: model:")


def test_cpu_mode_is_fp32_and_unsharded():
    cfg = PlanConfig.parse(model=str(CONFIGS / "qwen3-8b"), device="cpu")
    steps = {s["step"]: s for s in plan(cfg)["steps"]}
    shape = model_shape(CONFIGS / "qwen3-8b")
    assert steps["teacher-logits"]["parts_gib"]["weights"] == pytest.approx(4 * shape.params / 2**30, rel=1e-3)
    assert steps["distill"]["memory_bytes"] > 16 * shape.student_params(9)


def test_teacher_shards_divide_the_teacher_time_and_say_how_many_gpus_in_all():
    one, four = (
        {s["step"]: s for s in plan(PlanConfig.parse(model=str(CONFIGS / "qwen3-8b"), teacher_shards=n))["steps"]}
        for n in (1, 4)
    )
    assert four["teacher-logits"]["seconds"] == pytest.approx(one["teacher-logits"]["seconds"] / 4, abs=0.1)  # rounded
    # each task holds the whole teacher
    assert four["teacher-logits"]["memory_bytes"] == one["teacher-logits"]["memory_bytes"]
    assert "4 tasks in parallel" in four["teacher-logits"]["note"]
    assert four["search"] == one["search"] and four["distill"] == one["distill"]
