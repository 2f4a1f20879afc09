"""The masked view: identity for skipped layers, exact for kept ones, gradients through a gate."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from e3prune.errors import E3PruneError
from e3prune.masking import GatedLayer, gated_layers, masked_view


def test_full_keep_is_the_model_and_layers_are_restored():
    model = tiny_model("qwen3")
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        want = model(x).logits
        originals = list(model.model.layers)
        with masked_view(model, range(6)):
            assert all(isinstance(m, GatedLayer) for m in model.model.layers)
            got = model(x).logits
    assert torch.equal(want, got)
    assert list(model.model.layers) == originals


def test_skipped_layer_is_identity():
    """A skipped layer hands its input on unchanged; a kept one changes it."""
    model = tiny_model("llama")
    x = torch.randint(0, VOCAB, (1, 10))
    seen = {}
    with torch.no_grad(), masked_view(model, [0, 1, 3, 4, 5]):
        hooks = [
            layer.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out)))
            for i, layer in enumerate(model.model.layers)
        ]
        model(x)
        for h in hooks:
            h.remove()
    assert seen[2][1] is seen[2][0]
    assert not torch.equal(seen[1][1], seen[1][0])
    assert torch.equal(seen[3][0], seen[1][1])


def test_gate_tensor_mixes_and_carries_gradient():
    model = tiny_model("llama")
    x = torch.randint(0, VOCAB, (1, 8))
    with gated_layers(model) as gates:
        with torch.no_grad():
            gates[3].gate = 0.0
            h_off = model(x).logits
            gates[3].gate = 1.0
            h_on = model(x).logits
        g = torch.tensor(0.25, requires_grad=True)
        gates[3].gate = g
        logits = model(x).logits
        logits.sum().backward()
    assert g.grad is not None and torch.isfinite(g.grad)
    # The gate enters linearly at its layer; the logits at g=0.25 lie between the two extremes.
    assert not torch.allclose(logits.detach(), h_on) and not torch.allclose(logits.detach(), h_off)


def test_nested_views_are_refused():
    model = tiny_model("llama")
    with masked_view(model, [0, 1]):
        with pytest.raises(E3PruneError):
            with masked_view(model, [0]):
                pass


def test_closed_gate_skips_the_layer_backward_exactly():
    """A hard-0 gate run without a graph gives the same gradients as the full computation."""
    model = tiny_model("llama")
    model.requires_grad_(False)
    x = torch.randint(0, VOCAB, (2, 8))
    grads = []
    for closed in (False, True):
        with gated_layers(model) as gates:
            m = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], requires_grad=True)
            soft = torch.sigmoid(torch.linspace(-1, 1, 6, requires_grad=False) + m)  # any differentiable path
            st = m.detach() + (soft - soft.detach())
            for i, g in enumerate(gates):
                g.gate, g.closed = st[i], closed and m[i].item() == 0
            model(x).logits.pow(2).mean().backward()
            grads.append(m.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7) and grads[0].abs().sum() > 0
