"""Linear correction (docs/method.md, "Linear correction (beyond the paper)") on tiny random models:
the statistics against explicit sums, the fold against Y + M T computed by hand, the fitted residual
against an explicit forward of the corrected pruned model, and hardening with the correction on real
sampled data and a real teacher cache (reload, logit check, pruning.json)."""

import json
import math

import pytest
import torch
from tiny_models import COMMON, save_tiny_qwen3_with_reference_tokenizer, tiny_config
from transformers import AutoModelForCausalLM

from e3prune.adapters import get_adapter
from e3prune.data import SampleConfig, SourceSpec, sample_data
from e3prune.errors import E3PruneError
from e3prune.harden import HardenConfig, harden, harden_checkpoint, probe_batch
from e3prune.linear_correction import (
    SKIPPED_AT_START,
    NormalEquations,
    apply_linear_correction,
    calibration_input_ids,
    fit_linear_correction,
    fold_into_mlp_out,
    removed_runs,
)
from e3prune.masking import masked_view
from e3prune.teacher import TeacherLogitsConfig, teacher_logits

SEQ = 32
KEEP = [0, 2, 3, 5]  # runs [1] (into layer 0) and [4] (into layer 3)


def _model(family: str, vocab: int = COMMON["vocab_size"], seed: int = 0, **overrides):
    config = tiny_config(family)
    config.vocab_size = vocab
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ids(vocab: int, sequences: int, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (sequences, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _layer_io(model, ids, layer_ids, keep=None):
    """Explicitly, by hooks of this test: per layer i, (Y_i, M_i, h_i) float64 rows, in the masked
    view of ``keep`` (the full model when None)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    got, handles = {}, []
    for i in layer_ids:
        handles.append(layers[i].mlp.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("m", i), o)))
        handles.append(
            layers[i].register_forward_hook(
                lambda m, a, o, i=i: got.__setitem__(("h", i), o[0] if isinstance(o, tuple) else o)
            )
        )
    try:
        if keep is None:
            model(input_ids=ids, use_cache=False)
        else:
            with masked_view(model, keep):
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i in layer_ids:
        m = got[("m", i)].reshape(-1, model.config.hidden_size).double()
        h = got[("h", i)].reshape(-1, model.config.hidden_size).double()
        out[i] = (h - m, m, h)
    return out


def test_removed_runs():
    assert removed_runs([0, 2, 3, 5], 6) == [(1,), (4,)]
    assert removed_runs([2, 3, 5], 6) == [(0, 1), (4,)]
    assert removed_runs([0, 1, 2], 6) == [(3, 4, 5)]
    assert removed_runs(list(range(6)), 6) == []


def test_normal_equations_match_explicit_sums():
    torch.manual_seed(0)
    m, y, target = torch.randn(50, 6), torch.randn(50, 6), torch.randn(50, 6)
    st = NormalEquations(6, torch.device("cpu"))
    st.add(m[:20], y[:20], target[:20])  # streamed in two batches
    st.add(m[20:], y[20:], target[20:])
    m, y, target = m.double(), y.double(), target.double()
    T = torch.randn(6, 6, dtype=torch.float64)
    assert st.tokens == 50
    assert math.isclose(st.residual(T), float(((m @ T + y - target) ** 2).sum()), rel_tol=1e-10)
    assert math.isclose(st.residual(None), float(((m + y - target) ** 2).sum()), rel_tol=1e-10)
    # Ridge 0 on a full-rank system: the least-squares solution, as lstsq computes it.
    want = torch.linalg.lstsq(m, target - y).solution
    assert torch.allclose(st.solve(0.0), want, atol=1e-9)
    # The ridge pulls towards the identity: a huge ridge returns (almost) the identity.
    assert torch.allclose(st.solve(1e9), torch.eye(6, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize(
    "family,overrides",
    [("llama", {}), ("llama", {"mlp_bias": True}), ("qwen3", {}), ("qwen3_moe", {}), ("mistral", {}), ("phi3", {})],
    ids=["llama", "llama-bias", "qwen3", "qwen3_moe", "mistral", "phi3"],
)
def test_fold_is_exact(family, overrides):
    model = _model(family, **overrides)
    adapter = get_adapter(model)
    ids = _ids(model.config.vocab_size, 2)
    layer_ids = [1, 3] if family == "qwen3_moe" else [2]  # Qwen3-MoE: layer 1 sparse, layer 3 dense
    before = _layer_io(model, ids, layer_ids)
    d = model.config.hidden_size
    Ts = {i: torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, dtype=torch.float64) for i in layer_ids}
    layers = adapter.decoder_layers(model)
    for i in layer_ids:
        w, b = adapter.mlp_out_proj(layers[i])
        assert (b is not None) == bool(overrides.get("mlp_bias"))
        fold_into_mlp_out(adapter, layers[i], Ts[i])
    # Only layer i's MLP output changed, so its input and Y_i are the same; the first corrected layer
    # sees exactly the same input, and its output must be Y + M T.
    first = layer_ids[0]
    after = _layer_io(model, ids, [first])
    y, m, _ = before[first]
    assert torch.allclose(after[first][2], y + m @ Ts[first], atol=1e-5)
    if family == "qwen3_moe":
        assert "Sparse" in type(layers[1].mlp).__name__ and "Sparse" not in type(layers[3].mlp).__name__


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_post_normed_mlp_is_refused(family):
    model = _model(family)
    with pytest.raises(E3PruneError, match="post_feedforward_layernorm"):
        fit_linear_correction(model, KEEP, _ids(model.config.vocab_size, 2))


@pytest.mark.parametrize("inputs", ["pruned", "full"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fit_reduces_the_residual_of_the_corrected_pruned_model(family, inputs):
    """The recorded residuals are those of an explicit forward: before, the pruned model (or the full
    model's h_i, for ``full``) against the full model's L; after, the same with the maps folded in."""
    model = _model(family)
    ids = _ids(model.config.vocab_size, 16)  # 384 tokens, hidden 32
    runs = fit_linear_correction(model, KEEP, ids, batch_size=5, inputs=inputs)
    assert [r.removed for r in runs] == [[1], [4]] and [r.folded_into for r in runs] == [0, 3]
    assert all(r.tokens == ids.numel() and r.skipped is None for r in runs)
    full = _layer_io(model, ids, [0, 1, 3, 4])
    first = runs[0]
    y, m, h = full[0]
    L = full[1][2]
    rel = lambda x: float((x - L).norm() / L.norm())  # noqa: E731
    assert math.isclose(first.relative_residual_before, rel(h), rel_tol=1e-6)
    assert math.isclose(first.relative_residual_after, rel(y + m @ first.T), rel_tol=1e-6)
    # Fold and run: the corrected model reproduces the recorded "after" residual of every run.
    apply_linear_correction(model, runs)
    corrected = _layer_io(model, ids, [0, 3], keep=None if inputs == "full" else KEEP)
    for r in runs:
        if inputs == "full":  # the full model's Y_i, M_i (layer 3 sees an uncorrected input there)
            y, m, _ = full[r.folded_into]
            got = y + m @ r.T
        else:
            got = corrected[r.folded_into][2]
        L = full[r.removed[-1]][2]
        want = float((got - L).norm() / L.norm())
        assert math.isclose(r.relative_residual_after, want, rel_tol=1e-5), (r, want)
        assert r.relative_residual_after < r.relative_residual_before


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sequences,ridge", [(16, 0.0), (16, 1e-4), (1, 0.0), (1, 1e-4)])  # 1 × 24 tokens < hidden 32
def test_the_fit_never_increases_the_residual(seed, sequences, ridge):
    model = _model("llama", seed=seed)
    keep = sorted(torch.randperm(6, generator=torch.Generator().manual_seed(seed))[:3].tolist())
    for r in fit_linear_correction(model, keep, _ids(model.config.vocab_size, sequences, seed=seed), ridge=ridge):
        if r.skipped is None:
            assert r.relative_residual_after <= r.relative_residual_before + 1e-12


def test_a_run_at_the_start_is_skipped():
    model = _model("qwen3")
    keep = [2, 3, 5]
    runs = fit_linear_correction(model, keep, _ids(model.config.vocab_size, 4))
    assert runs[0].removed == [0, 1] and runs[0].folded_into is None and runs[0].T is None
    assert runs[0].skipped == SKIPPED_AT_START and runs[0].relative_residual_after is None
    assert runs[1].removed == [4] and runs[1].folded_into == 3 and runs[1].skipped is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_linear_correction(model, runs)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["model.layers.3.mlp.down_proj.weight"]


# --- hardening with the correction, on real sampled data and a real teacher cache ------------------


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, reference_dir):
    """A tiny Qwen3 with the reference tokenizer, sampled data with a search split, and its teacher cache."""
    root = tmp_path_factory.mktemp("lc")
    model_dir = save_tiny_qwen3_with_reference_tokenizer(root / "model", reference_dir, embed_scale=3.0)
    data = root / "data"
    sample_data(
        SampleConfig(
            sources=[SourceSpec(uri="builtin:reference")],
            tokenizer=str(model_dir),
            seq_len=SEQ,
            search_tokens=SEQ * 16,
            distill_tokens=0,
            eval_tokens=SEQ * 2,
            output=str(data),
        )
    )
    cache = root / "cache"
    teacher_logits(
        TeacherLogitsConfig(model=str(model_dir), data=str(data), output=str(cache), top_k=4, splits=["search"])
    )
    return model_dir, data, cache


def test_calibration_reads_the_search_split_of_data_or_cache(calibration):
    _, data, cache = calibration
    from e3prune.data import load_split

    search = load_split(str(data), "search")
    assert torch.equal(calibration_input_ids(str(data), 3 * SEQ + 1), search[:4])  # ⌈97 / 32⌉ sequences
    assert torch.equal(calibration_input_ids(str(cache), 10**9), search)  # capped by the split
    assert not torch.equal(search[:2], load_split(str(data), "eval"))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hardened_corrected_checkpoint_reloads_and_passes_the_check(family, calibration, tmp_path, no_partial_dirs):
    model_dir, data, cache = calibration
    if family == "llama":  # a Llama with the reference vocabulary, so the sampled ids fit it
        src = tmp_path / "src"
        _model("llama", vocab=AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size).save_pretrained(src)
    else:
        src = model_dir
    out = tmp_path / "out"
    result = harden_checkpoint(
        HardenConfig(
            model=str(src),
            output=str(out),
            remove_layers=[1, 4],
            linear_correction=True,
            calibration_data=str(cache),
            calibration_batch_size=3,
        )
    )
    assert result.verification.max_abs_logit_diff <= 1e-5 and result.verification.greedy_tokens_match
    record = json.loads((out / "pruning.json").read_text())["linear_correction"]
    assert record["corrected_layers"] == [0, 3] and record["calibration_tokens"] == 16 * SEQ
    assert record["calibration_split"] == "search" and record["inputs"] == "pruned"
    for run in record["runs"]:
        assert run["relative_residual_after"] < run["relative_residual_before"]

    # The checkpoint is the masked view of the source with the same fit folded in, not the plain one.
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(source) and reloaded.config.num_hidden_layers == 4
    plain = harden(source, KEEP)
    runs = fit_linear_correction(source, KEEP, calibration_input_ids(str(cache), 16 * SEQ), batch_size=3)
    apply_linear_correction(source, runs)
    probe = probe_batch(source.config.vocab_size, seed=3)
    with torch.no_grad(), masked_view(source, KEEP):
        want = source(input_ids=probe, use_cache=False).logits
    with torch.no_grad():
        got = reloaded(input_ids=probe, use_cache=False).logits
        uncorrected = plain(input_ids=probe, use_cache=False).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - uncorrected).abs().max().item() > 1e-3


def test_harden_records_a_skipped_run_at_the_start(calibration, tmp_path):
    model_dir, data, _ = calibration
    out = tmp_path / "out"
    harden_checkpoint(
        HardenConfig(
            model=str(model_dir),
            output=str(out),
            remove_layers=[0, 1, 4],
            linear_correction=True,
            calibration_data=str(data),
        )
    )
    record = json.loads((out / "pruning.json").read_text())["linear_correction"]
    assert record["corrected_layers"] == [3]
    assert record["runs"][0] == {
        "removed": [0, 1],
        "folded_into": None,
        "tokens": 0,
        "relative_residual_before": None,
        "relative_residual_after": None,
        "skipped": SKIPPED_AT_START,
    }


def test_linear_correction_needs_calibration_data(tmp_path):
    with pytest.raises(E3PruneError, match="calibration_data"):
        HardenConfig.parse({"model": "m", "output": str(tmp_path / "o"), "keep_layers": [0], "linear_correction": True})
