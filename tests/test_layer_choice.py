"""Teacher cache, selectors and the E³ search as steps, on a tiny Qwen3 model that uses the
reference tokenizer, so the real data, cache and search code paths run end to end in seconds."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import save_tiny_qwen3_with_reference_tokenizer

from e3prune import storage
from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.errors import E3PruneError
from e3prune.resumable import ResumableState
from e3prune.search import SearchConfig, search_mask
from e3prune.selection import SELECTORS, Calibration, SelectConfig, n_remove_for, select_layers
from e3prune.teacher import TeacherLogitsConfig, TeacherTopK, teacher_logits, topk_logits

SEQ = 32
IDENTITY_LAYERS = [3, 4]  # made exact identities: every sensible selector must remove these
STATE_FILES = ("_COMPLETE.json", "progress.json", "search_state.json", "search_state.safetensors")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, reference_dir):
    """6-layer Qwen3 with the reference vocabulary; layers 3 and 4 write nothing to the residual."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    return save_tiny_qwen3_with_reference_tokenizer(d, reference_dir, identity_layers=tuple(IDENTITY_LAYERS))


@pytest.fixture(scope="module")
def tiny_data(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "sample"
    sample_data(
        SampleConfig(
            sources=[SourceSpec(uri="builtin:reference")],
            tokenizer=str(tiny_lm),
            seq_len=SEQ,
            search_tokens=SEQ * 24,
            distill_tokens=SEQ * 8,
            eval_tokens=SEQ * 8,
            output=str(out),
        )
    )
    return out


@pytest.fixture(scope="module")
def tiny_cache(tiny_lm, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "teacher"
    teacher_logits(
        TeacherLogitsConfig(
            model=str(tiny_lm),
            data=str(tiny_data),
            output=str(out),
            top_k=10,
            splits=["search", "distill"],
            shard_sequences=5,
            batch_size=4,
        )
    )
    return out


def test_cache_holds_exact_topk_and_streams_across_shards(tiny_lm, tiny_cache):
    cache = TeacherTopK(str(tiny_cache))
    assert cache.top_k == 10 and cache.seq_len == SEQ and cache.sequences("search") == 24
    assert cache.manifest["bytes_per_token"] == {"logits": 64, "input_ids": 4}
    assert len(cache.manifest["splits"]["search"]["shards"]) == 5  # 24 sequences, 5 per shard
    whole = cache.load("search")
    assert whole["values"].dtype == torch.bfloat16 and whole["ids"].dtype == torch.int32
    assert whole["lse"].dtype == torch.float32 and whole["values"].shape == (24, SEQ, 10)
    part = cache.batch("search", 3, 9)  # crosses the shard boundaries at 5 and 10
    for key in whole:
        assert torch.equal(part[key], whole[key][3:12])
    batches = list(cache.iter_batches("search", 7))
    assert [b["input_ids"].size(0) for b in batches] == [7, 7, 7, 3]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    want = topk_logits(model, whole["input_ids"][:2], 10)
    assert torch.equal(want["ids"], whole["ids"][:2])
    assert torch.allclose(want["lse"], whole["lse"][:2], atol=1e-5)
    # exact probabilities on the top-K: exp(v - lse) sums to at most 1
    p = torch.exp(whole["values"].float() - whole["lse"].unsqueeze(-1)).sum(-1)
    assert (p <= 1.0 + 1e-2).all() and (p > 0).all()


def test_cache_bad_input(tiny_lm, tiny_data, tmp_path, reference_dir):
    with pytest.raises(E3PruneError) as err:
        teacher_logits(
            TeacherLogitsConfig(model=str(tiny_lm), data=str(tiny_data), output=str(tmp_path / "c"), top_k=5000)
        )
    assert err.value.field == "top_k" and "vocabulary" in str(err.value)
    # A model whose tokenizer differs from the one the data was sampled with.
    other = tmp_path / "other"
    shutil.copytree(tiny_lm, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz_extra"] = len(tok["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(E3PruneError) as err:
        teacher_logits(TeacherLogitsConfig(model=str(other), data=str(tiny_data), output=str(tmp_path / "c")))
    assert err.value.field == "data" and "another tokenizer" in str(err.value)
    # A split that was not sampled.
    with pytest.raises(E3PruneError) as err:
        TeacherLogitsConfig.parse(model=str(tiny_lm), data=str(tiny_data), output=str(tmp_path / "c"), splits=["train"])
    assert err.value.field.startswith("splits")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("method", ["block_influence", "angular", "kl_oneshot", "sleb", "exhaustive"])
def test_selectors_find_the_identity_layers(tiny_lm, tiny_cache, method):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    calib = Calibration.from_batch(TeacherTopK(str(tiny_cache)).load("search"), 8)
    sel = SELECTORS[method](model, calib, 2, criterion="kl")
    assert sel.removed == IDENTITY_LAYERS, sel
    assert sel.keep == [0, 1, 2, 5] and sel.layer_tokens > 0
    assert SELECTORS["last"](model, calib, 2).removed == [4, 5]


def test_select_step_and_ratio_errors(tiny_lm, tiny_cache, tmp_path):
    sel = select_layers(
        SelectConfig(
            model=str(tiny_lm),
            teacher_cache=str(tiny_cache),
            output=str(tmp_path / "s"),
            method="kl_oneshot",
            remove_ratio=0.34,
        )
    )
    assert sel.removed == IDENTITY_LAYERS
    assert json.loads((tmp_path / "s" / "selection.json").read_text())["removed"] == IDENTITY_LAYERS
    for ratio, words in [
        (0.0, "strictly between 0 and 1"),
        (1.0, "strictly between 0 and 1"),
        (1.5, "strictly"),
        (0.05, "rounds to 0 layers"),
    ]:
        with pytest.raises(E3PruneError) as err:
            n_remove_for(ratio, 6)
        assert err.value.field == "remove_ratio" and words in str(err.value)
    with pytest.raises(E3PruneError) as err:
        select_layers(
            SelectConfig(
                model=str(tiny_lm),
                teacher_cache=str(tiny_cache),
                output=str(tmp_path / "x"),
                method="exhaustive",
                remove_ratio=0.5,
                max_combinations=10,
            )
        )
    assert err.value.field == "max_combinations"


def _search_cfg(tiny_lm, tiny_cache, out, **kw):
    base = dict(
        model=str(tiny_lm),
        teacher_cache=str(tiny_cache),
        output=str(out),
        selection_method="e3",
        remove_ratio=0.34,
        search_tokens=SEQ * 4 * 40,
        batch_size=4,
        init_sequences=8,
        final_sequences=8,
    )
    return SearchConfig(**{**base, **kw})


def test_search_finds_the_identity_layers_from_a_neutral_start(tiny_lm, tiny_cache, tmp_path):
    # init="zeros": the KL initialisation alone would already rank the identity layers last.
    res = search_mask(
        _search_cfg(tiny_lm, tiny_cache, tmp_path / "s", init="zeros", final_selection=False, curriculum=True)
    )
    assert res["removed"] == IDENTITY_LAYERS
    assert res["steps"] == 40 and res["search_tokens"] == 40 * 4 * SEQ
    traj = [json.loads(line) for line in (tmp_path / "s" / "trajectory.jsonl").read_text().splitlines()]
    assert len(traj) == 40 and traj[0]["k"] == 5 and traj[-1]["k"] == 4
    assert all(len(t["keep"]) == t["k"] for t in traj) and all(len(t["theta"]) == 6 for t in traj)
    # Full run with KL init and the final candidate scoring.
    res = search_mask(_search_cfg(tiny_lm, tiny_cache, tmp_path / "s2"))
    assert res["removed"] == IDENTITY_LAYERS and res["candidates"] and res["candidates"][0]["source"] == "topk_theta"
    assert not (tmp_path / "s2.state").exists()


def test_killed_search_resumes_to_the_same_mask(tiny_lm, tiny_cache, tmp_path):
    """A real SIGKILL mid-search; the rerun resumes from the saved state and ends exactly where an
    uninterrupted search ends (same θ, same mask)."""
    kw = dict(search_tokens=SEQ * 4 * 150, checkpoint_every_steps=5, init="zeros")
    want = search_mask(_search_cfg(tiny_lm, tiny_cache, tmp_path / "straight", **kw))

    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "e3prune.cli",
        "search",
        "--model",
        str(tiny_lm),
        "--teacher-cache",
        str(tiny_cache),
        "--output",
        str(out),
        "--remove-ratio",
        "0.34",
        "--selection-method",
        "e3",
        "--search-tokens",
        str(SEQ * 4 * 150),
        "--batch-size",
        "4",
        "--init",
        "zeros",
        "--init-sequences",
        "8",
        "--final-sequences",
        "8",
        "--checkpoint-every-steps",
        "5",
    ]
    state = tmp_path / "killed.state"
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 120
    while not list(state.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, f"the search ended before it could be killed:\n{log.read_text()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = max(json.loads(p.read_text())["step"] for p in state.glob("step-*/progress.json"))
    assert 0 < stopped_at < 150 and not out.exists()
    # Tensors in safetensors, the rest in JSON: nothing in the state is a pickle.
    files = {p.name for p in (state / f"step-{stopped_at:08d}").iterdir()}
    assert files == set(STATE_FILES) - {"_COMPLETE.json"}

    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads((out / "search.json").read_text())
    assert got["keep"] == want["keep"] and got["theta"] == want["theta"] and got["steps"] == 150
    traj = (out / "trajectory.jsonl").read_text().splitlines()
    assert len(traj) == 150 and [json.loads(t)["step"] for t in traj] == list(range(150))


class _Killed(Exception):
    """Stands for the end of a pod: raised right after a checkpoint was published."""


def test_search_state_on_s3_resumes_to_the_same_mask(tiny_lm, tiny_cache, tmp_path, s3, monkeypatch):
    """An ``s3://`` output keeps its state beside it on S3 (what a retried pod finds): a search stopped
    after its checkpoint of step 10 resumes from it, loads it without unpickling anything, and ends
    exactly where an uninterrupted search ends. Per-logit Adam and the KL initialisation, so that
    their state (a tensor step count, tuple betas, the initial scores) goes through the files too."""
    kw = dict(search_tokens=SEQ * 4 * 20, checkpoint_every_steps=5, optimizer="adam")
    want = search_mask(_search_cfg(tiny_lm, tiny_cache, tmp_path / "straight", **kw))
    cfg = _search_cfg(tiny_lm, tiny_cache, s3.uri("search"), **kw)
    published, publish = [], ResumableState.publish

    def publish_and_record(self, staging, step, progress=None):
        publish(self, staging, step, progress)
        published.append(step)
        if step == 10 and len(published) == 2:
            raise _Killed

    monkeypatch.setattr(ResumableState, "publish", publish_and_record)
    with pytest.raises(_Killed):
        search_mask(cfg)
    assert not storage.is_complete(cfg.output)
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=s3.key("search.state/"))["Contents"]
    names = {o["Key"].removeprefix(s3.key("search.state/")) for o in listed}
    assert names == {f"slot-{i}/{n}" for i in (0, 1) for n in STATE_FILES}  # JSON and safetensors only

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the search state must load without unpickling")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    got = search_mask(cfg)
    assert published == [5, 10, 15, 20]  # resumed after step 10
    assert got["keep"] == want["keep"] and got["theta"] == want["theta"]
    assert got["init_scores"] == want["init_scores"] and got["candidates"] == want["candidates"]
    trajectory = storage.read_file(cfg.output, "trajectory.jsonl")
    assert trajectory == (tmp_path / "straight" / "trajectory.jsonl").read_bytes()


def test_search_bad_input(tiny_lm, tiny_cache, tmp_path):
    with pytest.raises(E3PruneError) as err:
        search_mask(_search_cfg(tiny_lm, tiny_cache, tmp_path / "s", remove_ratio=0.05))
    assert err.value.field == "remove_ratio"
    with pytest.raises(E3PruneError) as err:
        SearchConfig.parse(model=str(tiny_lm), teacher_cache=str(tiny_cache), output="o", tau_start=0.1, tau_end=0.5)
    assert "tau_end" in str(err.value)
    assert not (tmp_path / "s").exists()
