"""Tiny random configurations of every supported family, with mixed per-layer patterns where the
family has them, so that slicing and renumbering are exercised for real."""

from __future__ import annotations

import torch

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SLIDING = [
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
]


def tiny_config(family: str):
    import transformers as t

    if family == "llama":
        return t.LlamaConfig(**COMMON)
    if family == "mistral":
        return t.MistralConfig(**COMMON, sliding_window=8)
    if family == "qwen2":
        # max_window_layers=3: layers 0..2 full attention, 3..5 sliding (Qwen2's own rule).
        return t.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=3)
    if family == "qwen3":
        return t.Qwen3Config(
            **COMMON,
            head_dim=8,
            use_sliding_window=True,
            sliding_window=8,
            layer_types=SLIDING,
            tie_word_embeddings=True,
        )
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(
            **{**COMMON, "intermediate_size": 64},
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        )
    if family == "gemma2":
        return t.Gemma2Config(**COMMON, head_dim=8, sliding_window=8)
    if family == "gemma3_text":
        return t.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=8, sliding_window_pattern=3)
    if family == "phi3":
        return t.Phi3Config(**COMMON)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    # Random init leaves some weights (e.g. norms) at trivial values; perturb every tensor so
    # that each layer really changes its input and a wrong copy cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_tiny_qwen3_with_reference_tokenizer(
    out_dir,
    reference_dir,
    *,
    embed_scale: float = 1.0,
    identity_layers: tuple[int, ...] = (),
    num_layers: int = 6,
    layer_scales: dict[int, float] | None = None,
):
    """A ``num_layers``-layer Qwen3 with the reference vocabulary and tokenizer, saved to ``out_dir``.

    ``embed_scale`` > 1 sharpens its distributions (a flat teacher makes every KL near zero);
    ``identity_layers`` write nothing to the residual stream, so every sensible selector must
    remove them; ``layer_scales`` multiplies what a layer writes to the residual stream (its
    attention and MLP output projections), so a large scale makes skipping that layer catastrophic.
    Data, caches and steps then run on it exactly as on a real checkpoint.
    """
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(reference_dir)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.model.embed_tokens.weight.mul_(embed_scale)
        for l in identity_layers:
            model.model.layers[l].self_attn.o_proj.weight.zero_()
            model.model.layers[l].mlp.down_proj.weight.zero_()
        for l, scale in (layer_scales or {}).items():
            model.model.layers[l].self_attn.o_proj.weight.mul_(scale)
            model.model.layers[l].mlp.down_proj.weight.mul_(scale)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
