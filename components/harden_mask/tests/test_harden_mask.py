import json


def test_writes_a_shallower_checkpoint_with_the_searched_layers(chain):
    from e3prune.model_io import load_config, model_dir

    model = chain.harden()["model"]
    keep = chain.search()["search"].metadata["keep"]
    assert model.metadata["kept_layers"] == keep and model.metadata["num_hidden_layers"] == 18
    assert load_config(model.metadata["uri"]).num_hidden_layers == 18
    pruning = json.loads((model_dir(model.metadata["uri"]) / "pruning.json").read_text())
    assert pruning["kept_layers"] == keep and pruning["method"] == "e3_gumbel_topk"
    assert pruning["source"]["revision"] == chain.revision()
    assert pruning["verification"]["greedy_tokens_match"]
