"""The settings of one whole compression run: every pipeline parameter, each declared once.

A parameter that belongs to one step is a field of that step's config, marked
``Annotated[..., PipelineParameter("pipeline_name")]`` (``e3prune.config``): its type, default,
range and description live there and nowhere else. :class:`RunConfig` is *built* from those
fields (``STEP_CONFIGS``) plus the few run-level settings of :class:`RunSettings` that belong to
no single step or that the pipeline spells differently from the step (a comma-separated string
for a list). The Kubeflow pipeline's signature, the ``detect_release`` component's signature,
``e3prune run``'s flags and the configuration docs are all derived from :class:`RunConfig`.

Following ``search_budget_tokens`` from the pipeline to the search loop:
``SearchConfig.search_tokens`` declares it → ``RunConfig.search_budget_tokens`` (a copy of that
field) → :meth:`RunSettings.search_params` (``{"search_tokens": …}``, validated by
``detect_release``) → the ``search_mask`` component → ``SearchConfig.parse({**params, …})``.

``detect_release`` validates the whole run with :meth:`RunSettings.check`, so a bad value is
rejected in seconds with a message naming the *pipeline parameter*, before any data is sampled or
any model loaded. ``e3prune run`` does the same before it starts the local runner.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

from pydantic import Field, create_model, field_validator

from e3prune.config import StepConfig, pipeline_parameters
from e3prune.data import DEFAULT_SOURCES, SampleConfig
from e3prune.distill import DistillConfig
from e3prune.errors import E3PruneError
from e3prune.evaluate import EvaluateConfig
from e3prune.gate import PromoteConfig
from e3prune.search import SearchConfig
from e3prune.teacher import TeacherLogitsConfig, check_shards
from e3prune.tracking import check_tracking_uri

# MLflow's registry accepts most characters; we keep names safe for S3 keys and URLs too.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# The steps whose marked fields are pipeline parameters, in the order the pipeline runs them.
STEP_CONFIGS: tuple[type[StepConfig], ...] = (
    SampleConfig,
    TeacherLogitsConfig,
    SearchConfig,
    DistillConfig,
    EvaluateConfig,
    PromoteConfig,
)
PLACEHOLDER = "/nonexistent/placeholder"  # paths for validating a step config without reading anything


class RunSettings(StepConfig):
    """The run-level parameters, and the typed step parameters derived from a whole run's values."""

    source_model: str = Field(
        "builtin:reference",
        description="model to compress: a hub id (org/name), s3://bucket/prefix (a model, or a folder of version "
        "folders: the newest is taken), models:/name (newest MLflow version), a directory in the image, or "
        "builtin:reference (the small shipped model)",
    )
    source_revision: str = Field(
        "",
        description="pin a release (hub branch, tag or commit; S3 version folder name; content sha256); empty: the newest",
    )
    registered_model_name: str = Field(
        "e3-pruner-reference", description="MLflow registered model that gets the new version (alias challenger)"
    )
    storage_prefix: str = Field(
        "",
        description="s3://bucket/prefix for step data (work/) and the exported model (models/); empty keeps "
        "everything in KFP artifacts (small models only)",
    )
    data_sources: str = Field(
        json.dumps(list(DEFAULT_SOURCES)),
        description="comma-separated data sources (jsonl/parquet/text files, hub dataset ids, builtin:reference, "
        "builtin:reference-train) or a JSON list of {uri, weight, text_field, messages_field, split, splits}; "
        "the default samples eval from the reference model's held-out corpus and search and distill from its "
        "training files",
    )
    lm_eval_tasks: str = Field(
        "", description="comma-separated lm-evaluation-harness tasks (e.g. python_stdlib_cloze); empty: none"
    )
    lm_eval_limit: int = Field(0, ge=0, description="items per lm-eval task; 0: all")
    mlflow_experiment: str = Field("e3-pruner", description="MLflow experiment of the run")
    mlflow_tracking_uri: str = Field(
        "",
        description="MLflow tracking URI; empty: MLFLOW_TRACKING_URI from the e3-pruner-env ConfigMap. No "
        "credentials in it: they go in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN "
        "(Secret e3-pruner-s3)",
    )
    gate_lm_eval_min: str = Field(
        "",
        description='promotion gate: JSON object of metric key to minimum, e.g. {"lm_eval.hellaswag.student.acc_norm": '
        "0.5}; empty: none",
    )
    force: bool = Field(False, description="compress even when the registry holds this release at this ratio already")

    @field_validator("registered_model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not MODEL_NAME.match(v):
            raise ValueError("use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _tracking_uri(cls, v: str) -> str:
        return check_tracking_uri(v)  # a password here would reach every log and record of the run

    @field_validator("storage_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("s3://") and len(v.rstrip("/")) <= len("s3://") or v.startswith(("gs://", "http")):
            raise ValueError("give s3://bucket/prefix or a local directory")
        return v.rstrip("/")

    # ------------------------------------------------------------- run-level values, converted

    def sources(self) -> list[dict[str, Any]]:
        text = self.data_sources.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError as exc:
                raise E3PruneError(f"not valid JSON: {exc}", field="data_sources") from None
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise E3PruneError('a JSON list of objects like {"uri": ...}', field="data_sources")
            return items
        uris = [u.strip() for u in text.split(",") if u.strip()]
        if not uris:
            raise E3PruneError("give at least one source", field="data_sources")
        return [{"uri": u} for u in uris]

    def tasks(self) -> list[str]:
        return [t.strip() for t in self.lm_eval_tasks.split(",") if t.strip()]

    def lm_eval_minimums(self) -> dict[str, float]:
        if not self.gate_lm_eval_min.strip():
            return {}
        try:
            value = json.loads(self.gate_lm_eval_min)
        except ValueError as exc:
            raise E3PruneError(f"not valid JSON: {exc}", field="gate_lm_eval_min") from None
        if not isinstance(value, dict) or not all(isinstance(v, int | float) for v in value.values()):
            raise E3PruneError(
                'a JSON object of metric key → number, like {"lm_eval.t.student.acc": 0.4}', field="gate_lm_eval_min"
            )
        return {str(k): float(v) for k, v in value.items()}

    # ------------------------------------------------------------- one step's parameters

    def step_values(self, step: type[StepConfig]) -> dict[str, Any]:
        """The values of ``step``'s pipeline parameters, under the step config's own field names."""
        return {field: getattr(self, param) for param, (field, _) in pipeline_parameters(step).items()}

    def sample_params(self) -> dict[str, Any]:
        return {**self.step_values(SampleConfig), "sources": self.sources()}

    def teacher_params(self) -> dict[str, Any]:
        return self.step_values(TeacherLogitsConfig)

    def search_params(self) -> dict[str, Any]:
        return self.step_values(SearchConfig)

    def distill_params(self) -> dict[str, Any]:
        return self.step_values(DistillConfig)

    def evaluate_params(self) -> dict[str, Any]:
        # The pipeline's 0 is the step's "all items" (its default, None: KFP cannot carry a null).
        limit = {"lm_eval_limit": self.lm_eval_limit} if self.lm_eval_limit else {}
        return {**self.step_values(EvaluateConfig), "lm_eval_tasks": self.tasks(), **limit}

    def gate_params(self) -> dict[str, Any]:
        return {**self.step_values(PromoteConfig), "lm_eval_min": self.lm_eval_minimums()}

    def step_params(self) -> dict[str, dict[str, Any]]:
        """Every step's validated parameters, by step (what ``detect_release`` hands to the steps)."""
        self.check()
        return {
            "sample": self.sample_params(),
            "teacher": self.teacher_params(),
            "search": self.search_params(),
            "distill": self.distill_params(),
            "evaluate": self.evaluate_params(),
            "gate": self.gate_params(),
        }

    def repeat_warnings(self) -> list[str]:
        """Where a budget reads its split more than once (repeated data over-fits: docs/method.md, Stage 0).

        The search trains on its split less the sequences held back for the final selection
        (``e3prune.search.held_back_sequences``), so the split must hold both to be read once.
        """
        from e3prune.search import held_back_sequences

        seq_len = self.seq_len
        search_seqs = math.ceil(self.search_split_tokens / seq_len)
        held = held_back_sequences(search_seqs, SearchConfig.model_fields["final_sequences"].default)
        reads = [
            ("search_budget_tokens", self.search_budget_tokens, "search_split_tokens", (search_seqs - held) * seq_len,
             held * seq_len),
            ("distill_budget_tokens", self.distill_budget_tokens, "distill_split_tokens", self.distill_split_tokens, 0),
        ]  # fmt: skip
        warnings = []
        for budget, used, split, size, extra in reads:
            if size and used > size:
                what = f"the {size:,} tokens it trains on of {split}" if extra else f"{split} ({size:,})"
                need = math.ceil((used + extra) / seq_len) * seq_len if extra else used
                held_note = f" (the budget plus {extra:,} held-back tokens)" if extra else ""
                warnings.append(
                    f"{budget} ({used:,}) reads {what} {used / size:.1f} times; "
                    f"raise {split} to {need:,}{held_note} to see each sequence once"
                )
        return warnings

    # ------------------------------------------------------------- validation

    def check(self) -> None:
        """Validate every step's config (placeholder paths; nothing is read): one error per bad parameter."""
        from e3prune import sources
        from e3prune.lm_eval_tasks.adapter import check_lm_eval_tasks

        sources.source_kind(self.source_model)
        p = PLACEHOLDER
        _validated(SampleConfig, self.sample_params(), tokenizer=p, output=p)
        teacher = _validated(TeacherLogitsConfig, self.teacher_params(), model=p, data=p, output=p)
        self._check_teacher_shards(teacher)
        _validated(SearchConfig, self.search_params(), model=p, teacher_cache=p, output=p)
        _validated(DistillConfig, self.distill_params(), student=p, teacher_cache=p, output=p)
        _validated(EvaluateConfig, self.evaluate_params(), teacher=p, pruned=p, student=p, data=p, output=p)
        _validated(PromoteConfig, self.gate_params(), model_name=self.registered_model_name)
        if self.tasks():
            check_lm_eval_tasks(self.tasks())

    def _check_teacher_shards(self, teacher: TeacherLogitsConfig) -> None:
        """``teacher_shards`` at most the cache files of the largest split the teacher reads (split tokens //
        seq_len sequences, ``teacher_shard_sequences`` a file): a task beyond that would compute nothing."""
        tokens = {
            "search": self.search_split_tokens,
            "distill": self.distill_split_tokens,
            "eval": self.eval_split_tokens,
        }
        sequences = {split: tokens[split] // self.seq_len for split in teacher.splits}
        check_shards(teacher.shards, sequences, teacher.shard_sequences, "teacher_shards", "teacher_shard_sequences")


# The step field a run-level parameter becomes, where the names differ (for error messages).
_RUN_LEVEL_FIELDS = {"sources": "data_sources", "lm_eval_min": "gate_lm_eval_min"}


def _validated(step: type[StepConfig], params: dict[str, Any], **paths: str) -> StepConfig:
    """``step`` built from a run's parameters; an error names the pipeline parameter, not the step field."""
    try:
        return step.parse({**params, **paths})
    except E3PruneError as exc:
        names = {field: param for param, (field, _) in pipeline_parameters(step).items()} | _RUN_LEVEL_FIELDS
        top = (exc.field or "").split(".")[0]
        message = str(exc).split(": ", 1)[1] if exc.field else str(exc)
        for field, param in sorted(names.items(), key=lambda kv: -len(kv[0])):
            message = re.sub(rf"\b{re.escape(field)}\b", param, message)
        raise E3PruneError(message, field=names.get(top, exc.field)) from None


def _run_config_fields() -> dict[str, Any]:
    """Every step's pipeline parameters as fields: the step's annotation and a copy of its field."""
    fields: dict[str, Any] = {}
    for step in STEP_CONFIGS:
        for param, (_, info) in pipeline_parameters(step).items():
            if param in fields or param in RunSettings.model_fields:
                raise TypeError(f"pipeline parameter {param!r} is declared twice ({step.__name__})")
            fields[param] = (info.annotation, copy.copy(info))
    return fields


RunConfig = create_model(
    "RunConfig",
    __base__=RunSettings,
    __module__=__name__,
    __doc__="Every parameter of the pipeline, with the defaults of ``e3prune run`` (derived from the step configs).",
    **_run_config_fields(),
)
