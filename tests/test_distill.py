"""Distillation (docs/method.md, Stage 5) as a step, on a tiny Qwen3 with the reference tokenizer: the
student is a hardened copy of a tiny teacher whose top-K logits are cached over real sampled data.
Covers training, the written checkpoint, 2 processes against 1, a real SIGKILL and resume, and the
errors a user can cause."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_qwen3_with_reference_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.distill import DistillConfig, distill
from e3prune.distill_inputs import plan_steps
from e3prune.distill_loss import EntropyAwareKD
from e3prune.distill_training import lr_factor
from e3prune.errors import E3PruneError
from e3prune.harden import PRUNING_FILE, harden
from e3prune.teacher import TeacherLogitsConfig, TeacherTopK, teacher_logits

SEQ = 32
SPLIT_SEQUENCES = 16
KEEP = [0, 2, 3, 5]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, reference_dir):
    """6-layer Qwen3 with the reference vocabulary, its embeddings scaled up so that its top-K
    holds real probability mass (a flat teacher would make every KL near zero)."""
    d = tmp_path_factory.mktemp("teacher") / "model"
    return save_tiny_qwen3_with_reference_tokenizer(d, reference_dir, embed_scale=3.0)


@pytest.fixture(scope="module")
def tiny_student(tiny_teacher, tmp_path_factory):
    """The teacher hardened to 4 of its 6 layers, with the pruning.json the harden step writes."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    d = tmp_path_factory.mktemp("student") / "model"
    harden(teacher, KEEP).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(d)
    (d / PRUNING_FILE).write_text(json.dumps({"format_version": 1, "kept_layers": KEEP, "removed_layers": [1, 4]}))
    return d


@pytest.fixture(scope="module")
def tiny_cache(tiny_teacher, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "sample"
    sample_data(
        SampleConfig(
            sources=[SourceSpec(uri="builtin:reference")],
            tokenizer=str(tiny_teacher),
            seq_len=SEQ,
            search_tokens=0,
            distill_tokens=SEQ * SPLIT_SEQUENCES,
            eval_tokens=SEQ * 2,
            output=str(data),
        )
    )
    out = tmp_path_factory.mktemp("cache") / "teacher"
    teacher_logits(
        TeacherLogitsConfig(
            model=str(tiny_teacher),
            data=str(data),
            output=str(out),
            top_k=10,
            splits=["distill"],
            shard_sequences=5,
            batch_size=8,
        )
    )
    return out


def _cfg(student, cache, out, **kw) -> DistillConfig:
    return DistillConfig(**{"student": str(student), "teacher_cache": str(cache), "output": str(out), **kw})


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _split_loss(model_dir: Path, cache_dir: Path) -> float:
    """The default loss (entropy_kd, γ=1, ε=0.1, λ=1) over the whole distill split, no gradient."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = TeacherTopK(str(cache_dir)).load("distill")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        return EntropyAwareKD(gamma=1.0, epsilon=0.1, ce_weight=1.0)(logits, batch)[0].item()


def test_schedule_and_step_plan():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1) and lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0) and lr_factor(99, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 1, 0, 0.2) == pytest.approx(1.0)
    kw = dict(student="s", teacher_cache="c", output="o", distill_tokens=1000, batch_size=2, grad_accumulation_steps=3)
    plan = plan_steps(DistillConfig(**kw, allow_repeat=True), num_processes=2, seq_len=10, split_sequences=100)
    assert (plan.global_batch_sequences, plan.total_steps) == (12, 9)  # ceil(1000 / 120)
    assert plan.process_slice(0, 1) == (6, 6) and plan.process_slice(8, 1) == (102 % 100, 6)  # wraps around
    with pytest.raises(E3PruneError) as err:  # 9 steps × 12 = 108 sequences > 100
        plan_steps(DistillConfig(**kw, allow_repeat=False), num_processes=2, seq_len=10, split_sequences=100)
    assert err.value.field == "distill_tokens" and "at most 960 tokens" in str(err.value)


def test_distillation_reduces_the_loss_and_writes_a_loadable_checkpoint(tiny_student, tiny_cache, no_partial_dirs):
    tmp = no_partial_dirs
    before = _split_loss(tiny_student, tiny_cache)
    seen = []
    summary = distill(
        _cfg(
            tiny_student,
            tiny_cache,
            tmp / "out",
            loss="entropy_kd",
            distill_tokens=SEQ * 8 * 16,
            batch_size=8,
            allow_repeat=True,
            learning_rate=3e-3,
            warmup_ratio=0.1,
            checkpoint_every_steps=5,
        ),
        callback=seen.append,
    )
    after = _split_loss(tmp / "out", tiny_cache)
    assert after < 0.8 * before, (before, after)
    assert summary["steps"] == 16 and summary["tokens"] == 16 * 8 * SEQ and summary["repeated_data"]
    assert summary["resumed_from_step"] == 0 and summary["num_processes"] == 1

    rows = _rows(tmp / "out")
    assert [r["step"] for r in rows] == list(range(1, 17)) and seen == rows
    assert rows[-1]["tokens"] == summary["tokens"] and all(r["tokens_per_second"] > 0 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(tmp / "out")
    assert model.config.num_hidden_layers == len(KEEP) and model.config.use_cache
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert AutoTokenizer.from_pretrained(tmp / "out") is not None
    pruning = json.loads((tmp / "out" / PRUNING_FILE).read_text())
    assert pruning["kept_layers"] == KEEP  # the source's record is kept ...
    d = pruning["distillation"]  # ... and the distillation added to it
    assert (d["loss"], d["gamma"], d["epsilon"], d["ce_weight"]) == ("entropy_kd", 1.0, 0.1, 1.0)
    assert d["tokens"] == summary["tokens"] and d["steps"] == 16 and d["final"]["loss"] == rows[-1]["loss"]
    assert not (tmp / "out.ckpt").exists()  # checkpoints are dropped once the output is written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # One thread a process: the machine has 2 cores, and two processes must not fight over them.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def test_two_processes_train_like_one(tiny_student, tiny_cache, tmp_path):
    """4 steps of 2 processes × batch 2 (torchrun via ``accelerate launch --multi_gpu``, which on a
    machine without CUDA runs gloo DDP because distill passes ``cpu=True`` to the Accelerator;
    ``--cpu --num_processes 2`` would start a single process) against 1 process × batch 4 and
    1 process × batch 2 × 2 accumulation steps, same seed and data, dropout off.

    Tolerances, with the measured values on this fixture: per-step loss within 1e-5 relative
    (measured 2e-7 against batch 4, exactly 0 against accumulation: gloo's fp32 all-reduce differs
    only in summation order); final weights within 1e-3 absolute (measured 8e-6). The weight bound
    is loose on purpose: AdamW normalises every update to about the learning rate (3e-3), so a
    gradient component near zero whose sign is decided by rounding moves by up to that much.
    Data given to the wrong process or step would show in the losses first.
    """
    common = [
        "--student",
        str(tiny_student),
        "--teacher-cache",
        str(tiny_cache),
        "--distill-tokens",
        str(4 * 4 * SEQ),
        "--checkpoint-every-steps",
        "2",
        "--learning-rate",
        "3e-3",
    ]
    two = tmp_path / "two"
    cmd = [
        sys.executable,  # not the `accelerate` script: a venv may have the package without its scripts
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "e3prune.cli",
        "distill",
        *common,
        "--output",
        str(two),
        "--batch-size",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((two / "distillation.json").read_text())["num_processes"] == 2

    kw = dict(distill_tokens=4 * 4 * SEQ, checkpoint_every_steps=2, learning_rate=3e-3)
    distill(_cfg(tiny_student, tiny_cache, tmp_path / "one", batch_size=4, **kw))
    distill(_cfg(tiny_student, tiny_cache, tmp_path / "accum", batch_size=2, grad_accumulation_steps=2, **kw))
    want = _rows(two)
    assert len(want) == 4
    two_weights = load_file(two / "model.safetensors")
    for name in ("one", "accum"):
        got = _rows(tmp_path / name)
        assert [r["step"] for r in got] == [1, 2, 3, 4]
        rel = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(got, want))
        assert rel < 1e-5, (name, rel)
        weights = load_file(tmp_path / name / "model.safetensors")
        assert max((weights[k] - two_weights[k]).abs().max().item() for k in weights) < 1e-3
    assert want[-1]["loss"] != want[0]["loss"]  # it trained


def test_killed_distillation_resumes_where_it_stopped(tiny_student, tiny_cache, tmp_path):
    """A real SIGKILL after the first checkpoint; the rerun of the same command resumes from it and
    ends with the same per-step losses as an uninterrupted run (same seed) within 1e-5."""
    steps, every = 30, 5
    want = distill(
        _cfg(
            tiny_student,
            tiny_cache,
            tmp_path / "straight",
            distill_tokens=steps * 2 * SEQ,
            batch_size=2,
            allow_repeat=True,
            checkpoint_every_steps=every,
        )
    )
    out, ckpt = tmp_path / "killed", tmp_path / "killed.ckpt"
    args = [
        sys.executable,
        "-m",
        "e3prune.cli",
        "distill",
        "--student",
        str(tiny_student),
        "--teacher-cache",
        str(tiny_cache),
        "--output",
        str(out),
        "--distill-tokens",
        str(steps * 2 * SEQ),
        "--batch-size",
        "2",
        "--allow-repeat",
        "--checkpoint-every-steps",
        str(every),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 120
    while not list(ckpt.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = max(json.loads(p.read_text())["step"] for p in ckpt.glob("step-*/progress.json"))
    assert 0 < stopped_at < steps and not out.exists()

    # The checkpoint belongs to these settings: a run with another learning rate must not pick it up.
    with pytest.raises(E3PruneError) as err:
        distill(
            _cfg(
                tiny_student,
                tiny_cache,
                out,
                distill_tokens=steps * 2 * SEQ,
                batch_size=2,
                allow_repeat=True,
                checkpoint_every_steps=every,
                learning_rate=1e-3,
            )
        )
    assert err.value.field == "checkpoint_dir" and "other settings (learning_rate)" in str(err.value)
    assert not out.exists()

    done = subprocess.run(args, capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from step {stopped_at}" in done.stdout
    summary = json.loads((out / "distillation.json").read_text())
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == want["steps"] == steps
    got, straight = _rows(out), _rows(tmp_path / "straight")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, straight)) < 1e-5
    assert not ckpt.exists()


def test_bad_input_fails_before_training_and_writes_nothing(tiny_student, tiny_cache, tmp_path):
    out = tmp_path / "out"

    def fails(field: str, words: str, student=tiny_student, **kw) -> None:
        with pytest.raises(E3PruneError) as err:
            distill(_cfg(student, tiny_cache, out, **{"distill_tokens": SEQ * 4, "batch_size": 2, **kw}))
        assert err.value.field == field and words in str(err.value), err.value
        assert not out.exists() and not (tmp_path / "out.ckpt").exists()

    # A student whose tokenizer is not the one the cache's data were tokenized with.
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_student, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz_extra"] = len(tok["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(tok))
    fails("teacher_cache", "another tokenizer", student=other)

    # A budget larger than the distill split, without allow_repeat.
    fails("distill_tokens", "allow_repeat", distill_tokens=SEQ * (SPLIT_SEQUENCES + 1), allow_repeat=False)

    # A checkpoint location that cannot be created (its parent is a file).
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    fails("checkpoint_dir", "cannot write checkpoints", checkpoint_dir=str(blocker / "ckpt"))
    assert blocker.read_text() == "not a directory"

    # A student with fewer positions than the cache's sequences have tokens.
    short = tmp_path / "short_positions"
    shutil.copytree(tiny_student, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = SEQ // 2
    (short / "config.json").write_text(json.dumps(config))
    fails("teacher_cache", "sequence layout does not match", student=short)

    # bf16 where the hardware has none (this machine has no CUDA).
    if not torch.cuda.is_available():
        fails("mixed_precision", "bf16", mixed_precision="bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "other_tokenizer", "short_positions"]


def test_checkpoints_on_s3_resume_from_the_newest_slot(tiny_student, tiny_cache, tmp_path, s3):
    """Checkpoints to an S3 prefix alternate between two marker-published slots and are kept after
    the run: a rerun with the same settings resumes from the newest (step 4 of 6) and retrains the
    last steps to the same losses."""
    kw = dict(distill_tokens=6 * 2 * SEQ, batch_size=2, checkpoint_every_steps=2, checkpoint_dir=s3.uri("ckpt"))
    first = distill(_cfg(tiny_student, tiny_cache, tmp_path / "out", **kw))
    keys = {
        o["Key"].removeprefix(s3.key("ckpt/"))
        for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=s3.key("ckpt/"))["Contents"]
    }
    assert {"slot-0/_COMPLETE.json", "slot-1/_COMPLETE.json", "slot-1/progress.json", "slot-1/metrics.jsonl"} <= keys
    want = _rows(tmp_path / "out")

    again = distill(_cfg(tiny_student, tiny_cache, tmp_path / "out", overwrite=True, **kw))
    assert (first["resumed_from_step"], again["resumed_from_step"]) == (0, 4)
    got = _rows(tmp_path / "out")
    assert [r["step"] for r in got] == list(range(1, 7))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)) < 1e-5
