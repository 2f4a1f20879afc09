"""One small chain of the components' own functions (``component.python_func``), shared by the
component tests: each test runs what it checks once and reuses what came before it.

The budgets are tiny (the reference model, 64-token sequences); what these tests check is the
wrapper — inputs mapped onto the library, outputs and their metadata, what a person reads in the
UI — while the library's tests check the method and the pipeline test checks the whole run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SOURCE = "builtin:reference"
# The pipeline's parameters for the chain; each step gets its part as detect_release hands it on.
SMALL = {"seq_len": 64, "search_split_tokens": 4096, "distill_split_tokens": 4096, "eval_split_tokens": 2048,
         "search_budget_tokens": 2048, "distill_budget_tokens": 2048, "distill_batch_size": 4}  # fmt: skip


def step_params(**overrides) -> dict[str, dict]:
    """Every step's parameters for the chain's run (``RunConfig.step_params``), by step."""
    from e3prune.run_config import RunConfig

    return RunConfig.parse({**SMALL, "data_sources": SOURCE, **overrides}).step_params()


class Chain:
    def __init__(self, root: Path):
        self.root = root
        self.prefix = str(root / "storage")
        self.done: dict[str, dict] = {}

    def params(self, step: str, **overrides) -> dict:
        """One step's parameters for this chain's run, with pipeline parameters overridden."""
        return step_params(**overrides)[step]

    def art(self, cls_name: str, name: str):
        from kfp import dsl

        cls = getattr(dsl, cls_name)
        (self.root / "artifacts").mkdir(exist_ok=True)  # KFP's executor creates it in a pod
        return cls(name=name, uri=str(self.root / "artifacts" / f"{name}-{len(self.done)}"), metadata={})

    def revision(self) -> str:
        if "revision" not in self.done:
            from e3prune import sources

            self.done["revision"] = {"value": sources.resolve(SOURCE).revision}
        return self.done["revision"]["value"]

    def sample(self) -> dict:
        if "sample" not in self.done:
            from e3prune_components.sample_data.component import sample_data

            out = {"data": self.art("Dataset", "data"), "summary": self.art("Markdown", "summary")}
            sample_data.python_func(
                source_model=SOURCE, source_revision=self.revision(), params=step_params()["sample"],
                storage_prefix=self.prefix, **out,
            )  # fmt: skip
            self.done["sample"] = out
        return self.done["sample"]

    def teacher(self) -> dict:
        if "teacher" not in self.done:
            from e3prune_components.join_teacher_cache.component import join_teacher_cache
            from e3prune_components.teacher_logits.component import teacher_logits

            part = self.art("Dataset", "cache")
            teacher_logits.python_func(
                source_model=SOURCE, source_revision=self.revision(), data=self.sample()["data"],
                storage_prefix=self.prefix, params=step_params()["teacher"], shard_index=0, cache=part,
            )  # fmt: skip
            joined = self.art("Dataset", "joined")
            join_teacher_cache.python_func(parts=[part], storage_prefix=self.prefix, cache=joined)
            self.done["teacher"] = {"part": part, "cache": joined}  # the pipeline's one task of teacher_shards = 1
        return self.done["teacher"]

    def search(self) -> dict:
        if "search" not in self.done:
            from e3prune_components.search_mask.component import search_mask

            out = {"search": self.art("Artifact", "search"), "metrics": self.art("Metrics", "metrics"),
                   "plot": self.art("HTML", "plot")}  # fmt: skip
            returned = search_mask.python_func(
                source_model=SOURCE, source_revision=self.revision(), teacher_cache=self.teacher()["cache"],
                storage_prefix=self.prefix, params=step_params()["search"], **out,
            )  # fmt: skip
            self.done["search"] = {**out, "returned": returned}
        return self.done["search"]

    def harden(self) -> dict:
        if "harden" not in self.done:
            from e3prune_components.harden_mask.component import harden_mask

            out = {"model": self.art("Model", "model")}
            harden_mask.python_func(
                source_model=SOURCE, source_revision=self.revision(), search=self.search()["search"],
                storage_prefix=self.prefix, **out,
            )  # fmt: skip
            self.done["harden"] = out
        return self.done["harden"]

    def distill(self) -> dict:
        if "distill" not in self.done:
            from e3prune_components.distill.component import distill

            out = {"distilled": self.art("Model", "distilled"), "metrics": self.art("Metrics", "metrics")}
            distill.python_func(
                model=self.harden()["model"], teacher_cache=self.teacher()["cache"], storage_prefix=self.prefix,
                params=step_params()["distill"], **out,
            )  # fmt: skip
            self.done["distill"] = out
        return self.done["distill"]

    def evaluate(self) -> dict:
        if "evaluate" not in self.done:
            from e3prune_components.evaluate.component import evaluate

            out = {"evaluation": self.art("Artifact", "evaluation"), "metrics": self.art("Metrics", "metrics"),
                   "report": self.art("Markdown", "report")}  # fmt: skip
            evaluate.python_func(
                source_model=SOURCE, source_revision=self.revision(), pruned=self.harden()["model"],
                distilled=self.distill()["distilled"], data=self.sample()["data"], storage_prefix=self.prefix,
                params=step_params()["evaluate"], **out,
            )  # fmt: skip
            self.done["evaluate"] = out
        return self.done["evaluate"]


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> Chain:
    return Chain(tmp_path_factory.mktemp("components"))
