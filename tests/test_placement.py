"""Where a model goes (e3prune.placement): the decision with made-up GPUs, and the CPU loads and
the step's refusal of ``device=cuda`` on this machine, for real."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_models import save_tiny_qwen3_with_reference_tokenizer, tiny_model

from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.errors import E3PruneError
from e3prune.placement import WORKING_MARGIN, Placement, align_io, check_device, load_placed, plan_placement
from e3prune.search import SearchConfig, _set_up
from e3prune.teacher import TeacherLogitsConfig, teacher_logits

GB = 10**9
NO_GPU = "cuda asked for but no GPU is visible (CUDA_VISIBLE_DEVICES="


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _qwen2_32b_on_meta():
    """A Qwen2.5-32B-shaped model on the meta device (32.8 B parameters, no memory)."""
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the decision


def test_no_gpu_or_cpu_asked_is_the_cpu_in_fp32():
    for device, gpus in (("auto", []), ("cpu", []), ("cpu", [80 * GB] * 8)):
        p = plan_placement(32 * GB, 8 * 10**9, device, gpus)
        assert p == Placement("cpu", torch.float32, None, torch.device("cpu"))
    assert plan_placement(32 * GB, 8 * 10**9, "cpu", [], dtype_override=torch.bfloat16).dtype == torch.bfloat16


def test_a_model_that_fits_goes_on_the_first_gpu_with_room_in_bf16():
    n = 8 * 10**9  # an 8B model: 16 GB of bf16 weights, 20 GB with the margin
    p = plan_placement(4 * n, n, "auto", [80 * GB])
    assert (p.kind, p.dtype, p.device_map, p.main_device) == ("cuda", torch.bfloat16, {"": 0}, torch.device("cuda", 0))
    assert p.needed_bytes == round(2 * n * (1 + WORKING_MARGIN))
    p = plan_placement(4 * n, n, "cuda", [12 * GB, 30 * GB, 80 * GB])  # GPU 0 is too full: the first with room
    assert p.main_device == torch.device("cuda", 1) and p.device_map == {"": 1}
    # A step that insists on fp32 is sized at 4 bytes a parameter: 40 GB no longer fit GPU 1.
    p = plan_placement(4 * n, n, "cuda", [12 * GB, 30 * GB, 80 * GB], dtype_override=torch.float32)
    assert (p.kind, p.dtype, p.main_device) == ("cuda", torch.float32, torch.device("cuda", 2))


def test_a_32b_model_is_sharded_over_eight_80gb_gpus_in_whole_layers():
    model, n = _qwen2_32b_on_meta()
    p = plan_placement(4 * n, n, "auto", [80 * GB] * 8, model=model)
    assert p.kind == "sharded" and p.dtype == torch.bfloat16
    assert p.max_memory == {i: int(80 * GB / (1 + WORKING_MARGIN)) for i in range(8)}
    devices = set(p.device_map.values())
    assert devices <= set(range(8)) and len(devices) > 1, p.device_map
    assert p.main_device == torch.device("cuda", p.device_map["model.embed_tokens"])
    # accelerate keeps a decoder layer (the model's _no_split_modules) on one GPU
    assert not [k for k in p.device_map if k.startswith("model.layers.") and k.count(".") > 2]
    assert {k for k in p.device_map if k.startswith("model.layers.")} == {f"model.layers.{i}" for i in range(64)}
    # One H200 (141 GB) holds it whole.
    assert plan_placement(4 * n, n, "auto", [141 * GB], model=model).kind == "cuda"


def test_a_model_that_fits_nowhere_is_one_error_with_needed_and_available():
    n = 70_600_000_000  # a 70B model: 141 GB of bf16 weights
    for gpus in ([141 * GB], [40 * GB, 40 * GB]):
        with pytest.raises(E3PruneError) as err:
            plan_placement(4 * n, n, "auto", gpus, visible="0,1")
        msg = str(err.value)
        assert err.value.field == "device"
        assert f"need {_gib(2 * n)}, {_gib(2 * n * (1 + WORKING_MARGIN))} with the 25% working margin" in msg
        assert f"have {_gib(sum(gpus))} free in all, the largest {_gib(max(gpus))}" in msg
        assert "CUDA_VISIBLE_DEVICES=0,1" in msg and "device=cpu" in msg


def test_cuda_without_a_visible_gpu_is_an_error_on_device():
    with pytest.raises(E3PruneError) as err:
        plan_placement(4 * GB, 10**9, "cuda", [], visible="")
    assert err.value.field == "device" and NO_GPU + ")" in str(err.value)
    with pytest.raises(E3PruneError) as err:
        check_device("cuda", gpus_visible=False)
    assert err.value.field == "device" and NO_GPU in str(err.value)
    check_device("cuda", gpus_visible=True)
    with pytest.raises(E3PruneError) as err:
        plan_placement(4 * GB, 10**9, "tpu", [])
    assert err.value.field == "device"


# --------------------------------------------------------------------------- real loads (CPU)


def test_load_placed_loads_a_tiny_model_in_fp32_on_the_cpu(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for device in ("auto", "cpu"):
        loaded, inputs_on = load_placed(tmp_path / "m", device)
        assert inputs_on == torch.device("cpu") and loaded.placement.kind == "cpu"
        assert {p.dtype for p in loaded.parameters()} == {torch.float32} and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, want)
        assert align_io(loaded, inputs_on, torch.device("cpu")) is loaded
    loaded, _ = load_placed(tmp_path / "m", "cpu", "bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    if not torch.cuda.is_available():
        with pytest.raises(E3PruneError, match="cuda asked for") as err:
            load_placed(tmp_path / "m", "cuda")
        assert err.value.field == "device"


def test_load_placed_still_refuses_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors.pop("model.layers.2.mlp.down_proj.weight")
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(E3PruneError, match="1 missing .*model.layers.2.mlp.down_proj.weight") as err:
        load_placed(tmp_path / "m", "auto", field="teacher")
    assert err.value.field == "teacher"


@pytest.fixture(scope="module")
def tiny_search_inputs(tmp_path_factory, reference_dir):
    """A tiny Qwen3 with the reference tokenizer, its sampled data and its teacher cache."""
    root = tmp_path_factory.mktemp("placement")
    model = save_tiny_qwen3_with_reference_tokenizer(root / "model", reference_dir)
    sample_data(
        SampleConfig(
            sources=[SourceSpec(uri="builtin:reference")],
            tokenizer=str(model),
            seq_len=32,
            search_tokens=32 * 8,
            distill_tokens=32 * 2,
            eval_tokens=32 * 2,
            output=str(root / "data"),
        )
    )
    teacher_logits(TeacherLogitsConfig(model=str(model), data=str(root / "data"), output=str(root / "cache")))
    return model, root / "cache"


def test_search_on_cpu_or_auto_loads_fp32_on_the_cpu(tiny_search_inputs, tmp_path):
    model, cache = tiny_search_inputs
    for device in ("cpu", "auto"):
        cfg = SearchConfig(
            model=str(model), teacher_cache=str(cache), output=str(tmp_path / device), device=device,
            selection_method="e3",
        )  # fmt: skip
        run = _set_up(cfg)
        assert run.input_device == torch.device("cpu")
        assert {(p.device.type, p.dtype) for p in run.model.parameters()} == {("cpu", torch.float32)}
        assert not any(p.requires_grad for p in run.model.parameters())


def _e3prune(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "e3prune.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_search_device_cuda_without_gpu_exits_2_before_loading_weights(tiny_search_inputs, tmp_path):
    model, cache = tiny_search_inputs
    broken = tmp_path / "model"  # the same checkpoint with unreadable weights: loading them would fail otherwise
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "search"
    proc = _e3prune("search", "--model", str(broken), "--teacher-cache", str(cache), "--output", str(out),
                    "--device", "cuda")  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: device: {NO_GPU})"), lines
    assert not out.exists()


def test_cli_search_device_cpu_runs_on_the_cpu(tiny_search_inputs, tmp_path):
    model, cache = tiny_search_inputs
    out = tmp_path / "search"
    proc = _e3prune("search", "--model", str(model), "--teacher-cache", str(cache), "--output", str(out),
                    "--device", "cpu", "--search-tokens", "256", "--batch-size", "4", "--init", "zeros",
                    "--no-final-selection", "--selection-method", "e3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "search.json").read_text())
    assert result["config"]["device"] == "cpu" and len(result["keep"]) == 6 - round(0.25 * 6)
