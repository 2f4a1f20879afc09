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
    params: dict,
    mlflow_tracking_uri: str,
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
        params: The gate's thresholds, validated by detect_release (gate_params).
        mlflow_tracking_uri: Overrides $MLFLOW_TRACKING_URI; empty: the pod's.

    Returns:
        promoted: Whether the version is champion now.
    """
    import logging
    from collections import namedtuple

    from e3prune.gate import PromoteConfig, promote

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    target = {"model_name": registered_model_name, "version": version, "tracking_uri": mlflow_tracking_uri or None}
    result = promote(PromoteConfig.parse({**params, **target}))
    with open(decision.path, "w") as fh:
        fh.write(result["summary_markdown"])
    print(result["summary_markdown"])
    return namedtuple("Promotion", ["promoted"])(bool(result["promoted"]))
