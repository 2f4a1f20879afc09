"""resumable: the checkpoint store of the search and the distillation, on a local directory and on a
real S3 server (SeaweedFS), and the pickle-free state files."""

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from e3prune import storage
from e3prune.errors import E3PruneError
from e3prune.resumable import ResumableState, load_tree, resume_key, save_tree

KEY = {"learning_rate": 0.1, "seed": 0}


def _save(store: ResumableState, step: int, files: dict[str, str]) -> None:
    staging = store.staging_dir(step)
    staging.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (staging / name).write_text(text)
    store.publish(staging, step, {"seconds": float(step)})


def _names(checkpoint: Path) -> set[str]:
    return {p.name for p in checkpoint.iterdir() if p.name not in (storage.MARKER, storage.VERIFIED)}


def test_resume_key_leaves_out_what_does_not_change_the_result():
    class Cfg(BaseModel):
        output: str
        lr: float
        every: int = 5

    assert resume_key(Cfg(output="a", lr=0.1), {"output", "every"}) == {"lr": 0.1}


def test_local_store_keeps_the_newest_complete_checkpoint(tmp_path):
    store = ResumableState(str(tmp_path / "state"), KEY, field="state")
    store.check_writable()
    assert store.latest() is None
    _save(store, 2, {"a.txt": "two"})
    _save(store, 4, {"b.txt": "four"})
    # A save killed before its rename: a staging directory, never a checkpoint.
    (tmp_path / "state" / ".step-00000006.partial").mkdir()
    (tmp_path / "state" / ".step-00000006.partial" / "b.txt").write_text("six")
    again = ResumableState(str(tmp_path / "state"), KEY, field="state")
    latest = again.latest()
    assert latest.name == "step-00000004" and _names(latest) == {"b.txt", "progress.json"}
    progress = again.read(latest)
    assert (progress["step"], progress["seconds"], progress["resume_key"]) == (4, 4.0, KEY)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [".step-00000006.partial", "step-00000004"]
    again.remove()
    assert not (tmp_path / "state").exists()


def test_other_settings_are_refused(tmp_path):
    _save(ResumableState(str(tmp_path / "state"), KEY, field="checkpoint_dir"), 2, {"a.txt": "x"})
    other = ResumableState(str(tmp_path / "state"), {**KEY, "learning_rate": 0.2}, field="checkpoint_dir")
    with pytest.raises(E3PruneError) as err:
        other.read(other.latest())
    assert err.value.field == "checkpoint_dir" and "other settings (learning_rate)" in str(err.value)


def test_s3_store_alternates_slots_and_ignores_a_half_written_one(s3):
    uri = s3.uri("ckpt")
    store = ResumableState(uri, KEY, field="state")
    store.check_writable()
    assert store.latest() is None
    _save(store, 2, {"a.txt": "two"})
    _save(store, 4, {"b.txt": "four"})
    latest = ResumableState(uri, KEY, field="state").latest()
    assert _names(latest) == {"b.txt", "progress.json"}
    assert json.loads((latest / "progress.json").read_text())["step"] == 4

    # The next save overwrites the older slot (slot-0, step 2) and removes what that one held.
    _save(store, 6, {"c.txt": "six"})
    fresh = ResumableState(uri, KEY, field="state")
    latest = fresh.latest()
    assert _names(latest) == {"c.txt", "progress.json"} and fresh.read(latest)["step"] == 6
    slot0 = {o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=s3.key("ckpt/slot-0/"))["Contents"]}
    assert slot0 == {s3.key(f"ckpt/slot-0/{n}") for n in ("c.txt", "progress.json", "_COMPLETE.json")}

    # A save of step 8 cut mid-upload into slot-1: its marker is gone (storage deletes it first)
    # and a newer progress.json is already there. The slot is ignored; step 6 is the newest.
    s3.client.delete_object(Bucket=s3.bucket, Key=s3.key("ckpt/slot-1/_COMPLETE.json"))
    s3.client.put_object(Bucket=s3.bucket, Key=s3.key("ckpt/slot-1/progress.json"), Body=b'{"step": 8}')
    after_cut = ResumableState(uri, KEY, field="state")
    latest = after_cut.latest()
    assert after_cut.read(latest)["step"] == 6 and _names(latest) == {"c.txt", "progress.json"}
    # ... and the rerun's next save goes to the broken slot, not over the good one.
    _save(after_cut, 8, {"d.txt": "eight"})
    assert ResumableState(uri, KEY, field="state").latest().joinpath("d.txt").read_text() == "eight"
    assert s3.client.get_object(Bucket=s3.bucket, Key=s3.key("ckpt/slot-0/c.txt"))["Body"].read() == b"six"

    with pytest.raises(E3PruneError) as err:
        other = ResumableState(uri, {**KEY, "seed": 1}, field="state")
        other.read(other.latest())
    assert err.value.field == "state" and "other settings (seed)" in str(err.value)


def test_trees_round_trip_exactly_without_pickle(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    theta, order = torch.randn(6, generator=gen), torch.randperm(9, generator=gen)
    tree = {
        "step": 7,
        "theta": theta,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(6)}}, "param_groups": []},
        "betas": (0.9, 0.999),
        "generator": gen.get_state(),
        "order": order,
        "rows": [{"loss": 0.1 + 0.2, "keep": [0, 2]}],
        "blob": b"\x00\xff",
        "nan": math.nan,
        "none": None,
        "$odd": "a key that looks like a tag",
    }
    save_tree(tree, tmp_path, "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a resumable state must load without unpickling")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    got = load_tree(tmp_path, "state")
    assert got.keys() == tree.keys() and got["step"] == 7 and got["rows"] == tree["rows"]
    for name in ("theta", "generator", "order"):
        assert torch.equal(got[name], tree[name]) and got[name].dtype == tree[name].dtype
    assert list(got["optimizer"]["state"]) == [0]  # an int key, as load_state_dict needs it
    assert torch.equal(got["optimizer"]["state"][0]["step"], torch.tensor(3.0))
    assert got["betas"] == (0.9, 0.999) and got["blob"] == b"\x00\xff" and math.isnan(got["nan"])
    assert got["$odd"] == tree["$odd"] and got["none"] is None
    restored = torch.Generator()
    restored.set_state(got["generator"])
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=gen))
    with pytest.raises(TypeError, match="cannot store a set"):
        save_tree({"bad": {1, 2}}, tmp_path, "other")
