"""Hardening on a tiny random model of every supported family: harden -> save -> reload ->
same logits as the masked view, same greedy tokens with the KV cache, per-layer fields sliced."""

import json

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from e3prune.adapters import get_adapter
from e3prune.harden import HardenConfig, harden, harden_checkpoint, probe_batch
from e3prune.masking import masked_view

REMOVE = [1, 4]
KEEP = [0, 2, 3, 5]


def _mlp_is_sparse(layer) -> bool:
    return "Sparse" in type(layer.mlp).__name__


@pytest.mark.parametrize("family", FAMILIES)
def test_harden_save_reload_matches_masked_view(family, tmp_path, no_partial_dirs):
    source = tiny_model(family)
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    source.save_pretrained(src_dir)

    result = harden_checkpoint(HardenConfig(model=str(src_dir), output=str(out_dir), remove_layers=REMOVE))
    assert result.kept_layers == KEEP and result.removed_layers == REMOVE
    assert result.verification.max_abs_logit_diff <= 1e-5 and result.verification.greedy_tokens_match

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=False).eval()
    assert type(reloaded) is type(source)
    assert reloaded.config.num_hidden_layers == len(KEEP)
    layers = get_adapter(reloaded).decoder_layers(reloaded)
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(KEEP)))

    # Every per-layer list is the source's, sliced to the kept layers, in order.
    for name in get_adapter(source).per_layer_fields:
        if getattr(source.config, name, None) is not None:
            assert getattr(reloaded.config, name) == [getattr(source.config, name)[i] for i in KEEP], name
    if family == "qwen3_moe":
        src_layers = get_adapter(source).decoder_layers(source)
        assert [_mlp_is_sparse(layers[j]) for j in range(len(KEEP))] == [_mlp_is_sparse(src_layers[i]) for i in KEEP]
        assert any(_mlp_is_sparse(layer) for layer in layers) and not all(_mlp_is_sparse(layer) for layer in layers)
    if source.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()

    probe = probe_batch(VOCAB, batch=2, length=24, seed=1)  # longer than the sliding windows (8)
    with torch.no_grad():
        got = reloaded(input_ids=probe, use_cache=False).logits
        with masked_view(source, KEEP):
            want = source(input_ids=probe, use_cache=False).logits
            want_tokens = source.generate(
                probe, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0
            )
        got_tokens = reloaded.generate(
            probe, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0
        )
    assert (got.float() - want.float()).abs().max().item() <= 1e-5
    assert torch.equal(got_tokens, want_tokens)

    pruning = json.loads((out_dir / "pruning.json").read_text())
    assert pruning["kept_layers"] == KEEP and pruning["removed_layers"] == REMOVE
    assert pruning["source"]["num_hidden_layers"] == 6 and pruning["num_hidden_layers"] == 4
    assert pruning["source"]["model_type"] == source.config.model_type
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "generation_config.json").is_file()


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_mixed_layer_types_keep_their_pattern(family):
    source = tiny_model(family)
    pattern = list(source.config.layer_types)
    assert len(set(pattern)) == 2, "the tiny config must mix sliding and full attention"
    for keep in ([0, 1, 2], [1, 2, 4, 5], [5], [0, 3, 5]):
        hardened = harden(source, keep)
        assert hardened.config.layer_types == [pattern[i] for i in keep]
        # The attention modules themselves were built for the right type.
        for new, old in enumerate(keep):
            attn = get_adapter(hardened).decoder_layers(hardened)[new].self_attn
            want_window = pattern[old] == "sliding_attention"
            assert (getattr(attn, "sliding_window", None) is not None) == want_window


def test_harden_copies_by_default_and_shares_on_request():
    source = tiny_model("llama")
    copied, shared = harden(source, [0, 5]), harden(source, [0, 5], share_weights=True)
    src_w = source.model.layers[5].mlp.up_proj.weight
    assert copied.model.layers[1].mlp.up_proj.weight.data_ptr() != src_w.data_ptr()
    assert shared.model.layers[1].mlp.up_proj.weight.data_ptr() == src_w.data_ptr()
    assert torch.equal(copied.model.layers[1].mlp.up_proj.weight, src_w)
