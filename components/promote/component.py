"""promote: the quality gate that moves the champion alias."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from e3prune_components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    registered_model_name: str,
    version: str,
    decision: Output[Markdown],
    gate_max_perplexity_ratio: float = 1.5,
    gate_min_speedup: float = 1.0,
    gate_lm_eval_min: str = "",
    gate_require_better_than_champion: bool = True,
    mlflow_tracking_uri: str = "",
) -> NamedTuple("Promotion", promoted=bool):
    """Checks the new version against the quality gate and makes it champion only if it passes.

    Absolute thresholds (distilled/teacher perplexity ratio, prefill speedup, lm-eval minimums)
    and, when asked, the current champion of the same source family (perplexity not worse). The
    decision and each reason are written as version tags and shown here; a rejected version keeps
    its challenger alias and the step still succeeds. `e3prune rollback` restores the previous
    champion.

    Args:
        registered_model_name: The registered model.
        version: The version register created.
        decision: Promoted or rejected, with every check and its numbers.
        gate_max_perplexity_ratio: Largest allowed distilled/teacher perplexity ratio.
        gate_min_speedup: Smallest allowed prefill speedup over the teacher.
        gate_lm_eval_min: JSON object of metric key to minimum; empty: none.
        gate_require_better_than_champion: Compare with the current champion of the same source.
        mlflow_tracking_uri: Overrides $MLFLOW_TRACKING_URI.

    Returns:
        promoted: Whether the version is champion now.
    """
    import logging
    from collections import namedtuple

    from e3prune.registry import promote
    from e3prune.run_config import RunConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = RunConfig.parse(
        registered_model_name=registered_model_name,
        gate_max_perplexity_ratio=gate_max_perplexity_ratio,
        gate_min_speedup=gate_min_speedup,
        gate_lm_eval_min=gate_lm_eval_min,
        gate_require_better_than_champion=gate_require_better_than_champion,
        mlflow_tracking_uri=mlflow_tracking_uri,
    )
    result = promote(run.promote_config(registered_model_name, version))
    with open(decision.path, "w") as fh:
        fh.write(result["summary_markdown"])
    print(result["summary_markdown"])
    return namedtuple("Promotion", ["promoted"])(bool(result["promoted"]))
