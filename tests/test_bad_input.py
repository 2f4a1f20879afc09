"""Bad input: one clear error naming the field, before heavy work, and no output that looks complete."""

import subprocess
import sys

import pytest
from tiny_models import tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from e3prune.config import StepConfig
from e3prune.errors import E3PruneError
from e3prune.harden import HardenConfig, harden_checkpoint


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "llama"
    tiny_model("llama").save_pretrained(d)
    return d


def _harden(src, out, **sel):
    return harden_checkpoint(HardenConfig(model=str(src), output=str(out), **sel))


@pytest.mark.parametrize(
    ("selection", "field", "words"),
    [
        ({"keep_layers": []}, "keep_layers", "empty"),
        ({"remove_layers": []}, "remove_layers", "no layers to remove"),
        ({"remove_layers": [2, 6]}, "remove_layers", "out of range"),
        ({"keep_layers": [0, -1]}, "keep_layers", "out of range"),
        ({"remove_layers": [1, 1]}, "remove_layers", "more than once"),
        ({"keep_layers": [3, 3, 4]}, "keep_layers", "more than once"),
        ({"remove_layers": [0, 1, 2, 3, 4, 5]}, "remove_layers", "keep at least one"),
    ],
)
def test_bad_layer_ids(src_dir, no_partial_dirs, selection, field, words):
    out = no_partial_dirs / "out"
    with pytest.raises(E3PruneError) as err:
        _harden(src_dir, out, **selection)
    assert err.value.field == field and words in str(err.value)
    assert "0..5" in str(err.value) or "out of range" not in words
    assert not out.exists()


def test_unsupported_architecture_lists_supported(tmp_path, no_partial_dirs):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    with pytest.raises(E3PruneError) as err:
        _harden(gpt2, no_partial_dirs / "out", remove_layers=[0])
    msg = str(err.value)
    assert "unsupported architecture" in msg and "GPT2LMHeadModel" in msg
    assert "qwen3" in msg and "llama" in msg and "gemma3_text" in msg
    assert not (no_partial_dirs / "out").exists()


def test_paths_that_are_not_models(tmp_path, no_partial_dirs):
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases = [
        (tmp_path / "missing", "does not exist"),
        (a_file, "is a file"),
        (empty, "no config.json"),
        (broken, "cannot be read"),
    ]
    for path, words in cases:
        with pytest.raises(E3PruneError) as err:
            _harden(path, no_partial_dirs / "out", remove_layers=[0])
        assert err.value.field == "model" and words in str(err.value), (path, str(err.value))
    assert not (no_partial_dirs / "out").exists()


def test_existing_output_is_neither_overwritten_nor_corrupted(src_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(E3PruneError) as err:
        _harden(src_dir, out, remove_layers=[1])
    assert err.value.field == "output"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_failure_while_saving_leaves_nothing(src_dir, no_partial_dirs, monkeypatch):
    from transformers import PreTrainedModel

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(OSError):
        _harden(src_dir, no_partial_dirs / "out", remove_layers=[1])
    assert not (no_partial_dirs / "out").exists()


def test_config_errors_name_the_field():
    with pytest.raises(E3PruneError) as err:
        HardenConfig.parse(model="m", output="o", keep_layers=[1], remove_layers=[2])
    assert "exactly one of keep_layers or remove_layers" in str(err.value)
    with pytest.raises(E3PruneError) as err:
        HardenConfig.parse(model="m", output="o", remove_layers=[1], dtype="int8")
    assert err.value.field == "dtype" and "float32" in str(err.value)
    with pytest.raises(E3PruneError) as err:
        HardenConfig.parse(model="m", output="o", remove_layers=[1], verify_atoll=1)
    assert err.value.field == "verify_atoll" and "unknown setting" in str(err.value)
    assert issubclass(HardenConfig, StepConfig)


def test_cli_prints_one_error_line_and_exits_2(src_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "e3prune.cli",
            "harden",
            str(src_dir),
            "--remove-layers",
            "1,9",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: remove_layers: layer ids [9] are out of range; the model has layers 0..5"]


def _broken_reference(tmp_path, how: str):
    """The shipped reference model with one tensor dropped (and one stray added), or its weights truncated."""
    import os
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from e3prune.reference import default_model

    d = tmp_path / how
    shutil.copytree(default_model(), d)
    weights = d / "model.safetensors"
    if how == "missing":
        tensors = load_file(weights)
        tensors.pop("model.layers.5.mlp.down_proj.weight")
        tensors["model.layers.99.stray.weight"] = torch.zeros(2)
        save_file(tensors, weights, metadata={"format": "pt"})
    else:
        os.truncate(weights, weights.stat().st_size // 2)
    return d


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("missing", "1 missing (model.layers.5.mlp.down_proj.weight); 1 unexpected (model.layers.99.stray.weight)"),
        ("truncated", "weights cannot be loaded"),
    ],
    ids=["missing", "truncated"],
)
def test_a_checkpoint_with_wrong_tensors_is_refused_with_one_line(tmp_path, how, words):
    """transformers would fill a missing weight with random values; harden must not write a "verified" model."""
    src = _broken_reference(tmp_path, how)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "e3prune.cli", "harden", str(src), "--remove-layers", "3,7", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: model: ") and words in line, line
    assert "Traceback" not in run.stderr
    assert not out.exists()
