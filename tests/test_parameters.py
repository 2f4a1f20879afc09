"""A parameter is declared once, on its step config, and everything else is derived from it.

Field by field: the pipeline's signature and docs, the compiled pipeline.yaml, the detect_release
component (generated), what each step receives, and the library's own defaults. Any drift in a
name, type, default or description fails here.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import yaml

from e3prune.config import PipelineParameter, pipeline_parameters
from e3prune.data_sources import SourceSpec
from e3prune.errors import E3PruneError
from e3prune.run_config import STEP_CONFIGS, RunConfig, RunSettings
from e3prune_components.detect_release.generate import STEP_OUTPUTS, is_current, kfp_type, sentence

KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN"}


def _pipeline_spec() -> dict:
    import e3prune_pipelines

    path = Path(e3prune_pipelines.__file__).parent / "e3_pruner" / "pipeline.yaml"
    return next(yaml.safe_load_all(path.read_text()))


def test_every_step_parameter_is_a_copy_of_its_step_field():
    declared = {}
    for step in STEP_CONFIGS:
        for param, (field, info) in pipeline_parameters(step).items():
            assert param not in declared, f"{param} declared by {declared.get(param)} and {step.__name__}"
            declared[param] = step.__name__
            mine = RunConfig.model_fields[param]
            assert mine.annotation == info.annotation, param
            assert mine.default == info.default, f"{param}: {mine.default} vs {step.__name__}.{field} {info.default}"
            assert mine.description == info.description, param
            assert mine.metadata == info.metadata, param  # ranges and validators travel with the field
    assert set(RunConfig.model_fields) == set(RunSettings.model_fields) | set(declared)


def test_the_pipeline_signature_is_run_config():
    from e3prune_pipelines.e3_pruner.pipeline import e3_pruner_pipeline

    signature = inspect.signature(e3_pruner_pipeline.pipeline_func)
    assert list(signature.parameters) == list(RunConfig.model_fields)
    inputs = e3_pruner_pipeline.component_spec.inputs
    for name, field in RunConfig.model_fields.items():
        assert signature.parameters[name].default == field.default, name
        assert signature.parameters[name].annotation is kfp_type(field.annotation), name
        assert inputs[name].description == sentence(field.description), name


def test_the_compiled_pipeline_has_every_parameter_with_its_default_type_and_description():
    params = _pipeline_spec()["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(RunConfig.model_fields)
    for name, field in RunConfig.model_fields.items():
        assert params[name]["defaultValue"] == field.default, name
        assert params[name]["parameterType"] == KFP_TYPES[kfp_type(field.annotation)], name
        assert params[name]["description"] == sentence(field.description), name


def test_detect_release_is_generated_from_run_config_and_takes_every_parameter_without_defaults():
    from e3prune_components.detect_release.component import detect_release

    assert is_current(), "components/detect_release/component.py is stale: run `e3prune compile`"
    inputs = detect_release.component_spec.inputs
    assert set(inputs) == set(RunConfig.model_fields)
    for name, field in RunConfig.model_fields.items():
        assert inputs[name].default is None and not inputs[name].optional, name
        assert (
            inputs[name].type
            == {str: "String", int: "Integer", float: "Float", bool: "Boolean"}[kfp_type(field.annotation)]
        ), name


def test_no_component_has_defaults_of_its_own():
    from e3prune_pipelines.compile import targets

    for name, (component, _) in targets().items():
        if name.startswith("pipeline"):  # the pipelines' parameters have their defaults: RunConfig's
            continue
        for param, spec in component.component_spec.inputs.items():
            assert spec.default is None and not spec.optional, f"{name}.{param} has a default of its own"


@pytest.mark.parametrize("step", STEP_OUTPUTS)
def test_each_step_gets_exactly_its_parameters_from_detect_release(step):
    components = _pipeline_spec()["components"]
    # The steps inside dsl.If, and inside the loops nested in it (the teacher's ParallelFor: comp-for-loop-N).
    dags = [c["dag"]["tasks"] for name, c in components.items() if name.startswith(("comp-condition-1", "comp-for-loop"))]
    consumers = [
        (task, spec["inputs"]["parameters"]["params"])
        for tasks in dags
        for task, spec in tasks.items()
        if "params" in spec.get("inputs", {}).get("parameters", {})
    ]
    sources = {task: p["componentInputParameter"] for task, p in consumers}
    wanted = f"pipelinechannel--detect-release-{step}_params"
    assert wanted in sources.values(), f"no step reads {step}_params: {sources}"


def test_default_run_gives_each_step_its_library_defaults():
    """The pipeline's defaults are the library's: a step built from the default run equals its own defaults."""
    steps = RunConfig().step_params()
    for step, cls in zip(STEP_OUTPUTS, STEP_CONFIGS, strict=True):
        for field, value in steps[step].items():
            assert field in cls.model_fields, f"{step} got {field}, which {cls.__name__} does not have"
            default = cls.model_fields[field].get_default(call_default_factory=True)
            if field == "sources":  # the pipeline's JSON string, the step's SourceSpec objects: the same sources
                assert [SourceSpec.model_validate(v) for v in value] == default
            else:
                assert value == default, (
                    f"{cls.__name__}.{field}: run gives {value!r}, the step's default is {default!r}"
                )


def test_a_step_error_names_the_pipeline_parameter():
    with pytest.raises(E3PruneError) as err:
        RunConfig.parse(search_tau_start=0.1, search_tau_end=0.5).check()
    assert err.value.field == "search_tau_end" and "search_tau_start" in str(err.value)
    with pytest.raises(E3PruneError) as err:
        RunConfig.parse(remove_ratio=1.5)
    assert str(err.value) == "remove_ratio: must be in (0, 1), got 1.5"


def test_an_unknown_selection_method_is_refused_by_the_first_step_with_the_allowed_list(tmp_path):
    """detect_release (the pipeline's first step, called as KFP calls it) refuses it before anything runs."""
    from kfp_calls import call_detect_release

    from e3prune.search import SelectionMethod

    allowed = "'e3', 'best', 'sleb', 'block_influence', 'angular', 'kl_oneshot', 'last' or 'random'"
    assert typing.get_args(SelectionMethod) == (
        "e3",
        "best",
        "sleb",
        "block_influence",
        "angular",
        "kl_oneshot",
        "last",
        "random",
    )
    with pytest.raises(E3PruneError) as err:
        call_detect_release(tmp_path, selection_method="greedy", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert err.value.field == "selection_method"
    assert str(err.value) == f"selection_method: Input should be {allowed} (got 'greedy')"
    assert not list(tmp_path.glob("detect-*/plan.md"))  # no plan: nothing was decided


def test_a_marked_field_must_be_a_kfp_type():
    assert kfp_type(typing.Literal["a", "b"]) is str
    with pytest.raises(TypeError):
        kfp_type(list[int])
    assert PipelineParameter().name is None


def test_readme_parameter_table_and_configuration_reference_are_fresh():
    from e3prune.config_docs import readme_with_table, render

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert readme == readme_with_table(readme), (
        "README.md's parameter table is stale: run `e3prune config-docs --write`"
    )
    assert (root / "docs" / "configuration.md").read_text() == render(), "run `e3prune config-docs --write`"


def test_step_parameters_are_json_kfp_can_carry():
    """A KFP struct holds no null: every step's parameters are plain JSON without None."""

    def walk(value):
        assert value is not None
        if isinstance(value, dict):
            [walk(v) for v in value.values()]
        elif isinstance(value, list):
            [walk(v) for v in value]
        else:
            assert isinstance(value, str | int | float | bool), value

    for params in RunConfig().step_params().values():
        walk(params)
    walk(RunConfig.parse(lm_eval_limit=5, lm_eval_tasks="python_stdlib_cloze").step_params())


def test_a_budget_that_repeats_its_split_is_named_in_the_plan(tmp_path):
    from kfp_calls import call_detect_release

    assert RunConfig().repeat_warnings() == []  # the default splits hold their budgets once, and the held-back part
    small = {"search_split_tokens": 65_536, "distill_split_tokens": 131_072}  # the defaults before issue 13
    warnings = RunConfig.parse(small).repeat_warnings()
    assert warnings == [
        "search_budget_tokens (614,400) reads the 32,768 tokens it trains on of search_split_tokens 18.8 times; "
        "raise search_split_tokens to 647,168 (the budget plus 32,768 held-back tokens) to see each sequence once",
        "distill_budget_tokens (524,288) reads distill_split_tokens (131,072) 4.0 times; "
        "raise distill_split_tokens to 524,288 to see each sequence once",
    ]
    assert RunConfig.parse(search_split_tokens=647_168, distill_split_tokens=524_288).repeat_warnings() == []
    # One token of budget more than the training part holds repeats it: the held-back part is not for training.
    assert len(RunConfig.parse(search_budget_tokens=614_401).repeat_warnings()) == 1
    out = call_detect_release(tmp_path, mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **small)
    assert f"- **Repeated data:** {warnings[0]}" in out.plan
