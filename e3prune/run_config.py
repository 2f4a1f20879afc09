"""The settings of one whole compression run: every pipeline parameter, validated at once.

The Kubeflow pipeline (``pipelines/e3_pruner``) exposes these as its parameters, and its first
step calls :meth:`RunConfig.check`, so a bad value is rejected in seconds with a message naming
the *pipeline parameter*, before any data is sampled or any model loaded. ``e3prune run`` does
the same before it starts the local runner.

Each step's own config (``SampleConfig``, ``SearchConfig``, ...) stays the contract of that step;
this module only maps pipeline parameter names onto step fields (``search_budget_tokens`` →
``SearchConfig.search_tokens``) and validates each step config with placeholder paths, so the
ranges live in one place: the step configs.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field, field_validator

from e3prune.config import StepConfig
from e3prune.errors import E3PruneError

# MLflow's registry accepts most characters; we keep names safe for S3 keys and URLs too.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# pipeline parameter -> (step, step field). Parameters not listed map to a field of the same name.
STEP_FIELDS: dict[str, dict[str, str]] = {
    "sample": {
        "seq_len": "seq_len",
        "search_split_tokens": "search_tokens",
        "distill_split_tokens": "distill_tokens",
        "eval_split_tokens": "eval_tokens",
        "sample_seed": "seed",
    },
    "teacher": {"top_k": "top_k", "teacher_batch_size": "batch_size"},
    "search": {
        "remove_ratio": "remove_ratio",
        "search_budget_tokens": "search_tokens",
        "search_batch_size": "batch_size",
        "search_learning_rate": "learning_rate",
        "search_tau_start": "tau_start",
        "search_tau_end": "tau_end",
        "search_seed": "seed",
    },
    "distill": {
        "distill_budget_tokens": "distill_tokens",
        "distill_loss": "loss",
        "distill_learning_rate": "learning_rate",
        "distill_batch_size": "batch_size",
        "distill_allow_repeat": "allow_repeat",
    },
    "evaluate": {"eval_batch_size": "batch_size", "lm_eval_limit": "lm_eval_limit"},
}


class RunConfig(StepConfig):
    """Every parameter of the pipeline, with the defaults of ``e3prune run``."""

    source_model: str = Field(
        "builtin:reference",
        description="model to compress: builtin:reference, a local directory, s3://bucket/prefix or a hub id",
    )
    source_revision: str = Field(
        "",
        description="pin a revision (hub branch/tag/commit, or the content sha256 of a local/S3 source); empty: newest",
    )
    data_sources: str = Field(
        "builtin:reference",
        description="comma-separated data sources (jsonl/parquet/text files, hub dataset ids, builtin:reference) "
        "or a JSON list of {uri, weight, text_field, messages_field, split}",
    )
    seq_len: int = Field(256, description="tokens per packed sequence")
    search_split_tokens: int = Field(65_536, description="tokens sampled for the search split")
    distill_split_tokens: int = Field(131_072, description="tokens sampled for the distill split")
    eval_split_tokens: int = Field(65_536, description="tokens sampled for the eval split")
    sample_seed: int = Field(0, description="seed of the data sampler")
    allow_repeat: bool = Field(False, description="let the sampler cycle documents when a source is too small")
    top_k: int = Field(10, description="teacher logits cached per token (K)")
    teacher_batch_size: int = Field(8, description="sequences per teacher forward")
    remove_ratio: float = Field(0.25, description="fraction of decoder layers to remove, in (0, 1)")
    search_budget_tokens: int = Field(614_400, description="tokens the Gumbel-TopK search trains on")
    search_batch_size: int = Field(8, description="sequences per search step")
    search_learning_rate: float = Field(0.05, description="learning rate of the keep-logits θ")
    search_tau_start: float = Field(1.0, description="Gumbel-TopK temperature at the start")
    search_tau_end: float = Field(0.05, description="Gumbel-TopK temperature at the end")
    search_seed: int = Field(0, description="seed of the Gumbel noise")
    distill_budget_tokens: int = Field(
        524_288, description="tokens of distillation (4 passes over the default distill split)"
    )
    distill_loss: str = Field("kd", description="kd (top-K KD), entropy_kd (entropy-aware) or ce")
    distill_learning_rate: float = Field(3e-4, description="peak AdamW learning rate of distillation")
    distill_batch_size: int = Field(8, description="sequences per distillation micro-batch")
    distill_allow_repeat: bool = Field(True, description="cycle the distill split when the budget is larger")
    eval_batch_size: int = Field(8, description="sequences per evaluation forward")
    lm_eval_tasks: str = Field(
        "", description="comma-separated lm-evaluation-harness tasks (e.g. python_stdlib_cloze); empty: none"
    )
    lm_eval_limit: int = Field(0, description="items per lm-eval task; 0: all")
    registered_model_name: str = Field("e3-pruner-reference", description="MLflow registered model name")
    storage_prefix: str = Field(
        "", description="s3://bucket/prefix (or a local directory) for step data and the exported model"
    )
    mlflow_experiment: str = Field("e3-pruner", description="MLflow experiment of the run")
    mlflow_tracking_uri: str = Field("", description="MLflow tracking URI; empty: $MLFLOW_TRACKING_URI")
    gate_max_perplexity_ratio: float = Field(1.5, description="gate: pruned/teacher perplexity at most this")
    gate_min_speedup: float = Field(1.0, description="gate: prefill speedup over the teacher at least this")
    gate_lm_eval_min: str = Field(
        "", description='gate: JSON object of metric → minimum, e.g. {"lm_eval.hellaswag.student.acc_norm": 0.5}'
    )
    gate_require_better_than_champion: bool = Field(
        True, description="gate: the distilled perplexity must not be worse than the current champion's (same source)"
    )
    force: bool = Field(False, description="compress even when the registry holds this release at this ratio")

    @field_validator("registered_model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not MODEL_NAME.match(v):
            raise ValueError("use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("storage_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("s3://") and len(v.rstrip("/")) <= len("s3://") or v.startswith(("gs://", "http")):
            raise ValueError("give s3://bucket/prefix or a local directory")
        return v.rstrip("/")

    @field_validator("gate_max_perplexity_ratio", "gate_min_speedup")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be > 0")
        return v

    # ------------------------------------------------------------------ step configs

    def _step(self, step: str, cls: type[StepConfig], fixed: dict[str, Any]) -> StepConfig:
        mapping = STEP_FIELDS[step]
        values = {field: getattr(self, param) for param, field in mapping.items()}
        try:
            return cls.parse({**values, **fixed})
        except E3PruneError as exc:
            # Name the pipeline parameter, not the step's field: that is what the user set.
            back = {field: param for param, field in mapping.items()}
            field = back.get(exc.field or "", exc.field)
            message = str(exc)
            for step_field, param in sorted(back.items(), key=lambda kv: -len(kv[0])):
                message = re.sub(rf"\b{re.escape(step_field)}\b(?=:)", param, message)
            raise E3PruneError(message.split(": ", 1)[1] if ": " in message else message, field=field) from None

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

    def sample_config(self, tokenizer: str, output: str):
        from e3prune.data import SampleConfig

        try:
            return self._step(
                "sample",
                SampleConfig,
                {
                    "sources": self.sources(),
                    "tokenizer": tokenizer,
                    "output": output,
                    "allow_repeat": self.allow_repeat,
                },
            )
        except E3PruneError as exc:
            if exc.field and exc.field.startswith("sources"):
                raise E3PruneError(str(exc).split(": ", 1)[-1], field="data_sources") from None
            raise

    def teacher_config(self, model: str, data: str, output: str):
        from e3prune.teacher import TeacherLogitsConfig

        return self._step("teacher", TeacherLogitsConfig, {"model": model, "data": data, "output": output})

    def search_config(self, model: str, teacher_cache: str, output: str, state: str | None = None):
        from e3prune.search import SearchConfig

        return self._step(
            "search", SearchConfig, {"model": model, "teacher_cache": teacher_cache, "output": output, "state": state}
        )

    def distill_config(self, student: str, teacher_cache: str, output: str, checkpoint_dir: str | None = None):
        from e3prune.distill import DistillConfig

        return self._step(
            "distill",
            DistillConfig,
            {"student": student, "teacher_cache": teacher_cache, "output": output, "checkpoint_dir": checkpoint_dir},
        )

    def evaluate_config(self, teacher: str, pruned: str, student: str, data: str, output: str):
        from e3prune.evaluate import EvaluateConfig

        fixed = {
            "teacher": teacher,
            "pruned": pruned,
            "student": student,
            "data": data,
            "output": output,
            "lm_eval_tasks": self.tasks(),
        }
        if self.lm_eval_limit == 0:
            fixed["lm_eval_limit"] = None
        try:
            return self._step("evaluate", EvaluateConfig, fixed)
        except E3PruneError as exc:
            if exc.field == "lm_eval_tasks":
                raise E3PruneError(str(exc).split(": ", 1)[-1], field="lm_eval_tasks") from None
            raise

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

    def promote_config(self, model_name: str, version: str | None = None):
        from e3prune.registry import PromoteConfig

        try:
            return PromoteConfig.parse(
                model_name=model_name,
                version=version,
                tracking_uri=self.mlflow_tracking_uri or None,
                max_perplexity_ratio=self.gate_max_perplexity_ratio,
                min_speedup=self.gate_min_speedup,
                lm_eval_min=self.lm_eval_minimums(),
                require_better_than_champion=self.gate_require_better_than_champion,
            )
        except E3PruneError as exc:
            names = {"max_perplexity_ratio": "gate_max_perplexity_ratio", "min_speedup": "gate_min_speedup",
                     "lm_eval_min": "gate_lm_eval_min"}  # fmt: skip
            raise E3PruneError(str(exc).split(": ", 1)[-1], field=names.get(exc.field or "", exc.field)) from None

    def check(self) -> None:
        """Validate every step's config (placeholder paths; nothing is read): one error per bad parameter."""
        from e3prune import sources
        from e3prune.evaluate import check_lm_eval_tasks

        sources.source_kind(self.source_model)
        if self.lm_eval_limit < 0:
            raise E3PruneError("must be ≥ 0 (0: all items)", field="lm_eval_limit")
        placeholder = "/nonexistent/placeholder"
        self.sample_config(placeholder, placeholder)
        self.teacher_config(placeholder, placeholder, placeholder)
        search = self.search_config(placeholder, placeholder, placeholder)
        self.distill_config(placeholder, placeholder, placeholder)
        self.evaluate_config(placeholder, placeholder, placeholder, placeholder, placeholder)
        self.promote_config(self.registered_model_name)
        if search.remove_ratio <= 0 or search.remove_ratio >= 1:
            raise E3PruneError(f"must be in (0, 1), got {search.remove_ratio}", field="remove_ratio")
        if self.tasks():
            check_lm_eval_tasks(self.tasks())
