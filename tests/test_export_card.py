"""The exported model card says how the student was recovered (e3prune/export.py)."""

from e3prune.export import ExportConfig, model_card

PRUNING = {
    "method": "e3_gumbel_topk",
    "kept_layers": [0, 1, 3],
    "removed_layers": [2],
    "source": {"model": "org/base", "revision": "abc", "num_hidden_layers": 4},
}
CFG = ExportConfig(model="m", destination="d", model_name="base-pruned", source_model="org/base")


def test_card_names_the_default_loss_and_when_to_try_the_papers():
    dist = {"loss": "kd", "gamma": 0.0, "epsilon": None, "ce_weight": 0.0, "tokens": 524288}
    card = model_card({**PRUNING, "distillation": dist}, None, CFG)
    assert "## Recovery" in card and "Distilled with `kd` (plain top-K KD; γ = 0.0, λ = 0.0) on 524,288 tokens." in card
    assert "`distill_loss: entropy_kd`" in card and "3.5–5.3 % lower held-out perplexity" in card


def test_card_with_the_papers_loss_gives_no_advice_and_a_harden_only_model_no_section():
    dist = {"loss": "entropy_kd", "gamma": 1.0, "epsilon": 0.1, "ce_weight": 1.0, "tokens": 1024}
    card = model_card({**PRUNING, "distillation": dist}, None, CFG)
    assert "Distilled with `entropy_kd` (E³'s entropy-aware" in card and "distil once with it" not in card
    assert "## Recovery" not in model_card(PRUNING, None, CFG)
