"""Every component directory follows the layout of the Kubeflow component catalog
(kubeflow/pipelines-components): ``component.py``, the compiled ``component.yaml``, ``README.md``,
``metadata.yaml``, ``OWNERS`` and a ``tests/`` directory, all shipped with ``e3prune_components``.

The ``metadata.yaml`` checks follow the catalog's own validator: required keys in its order,
``stability`` one of its values, a Kubeflow ``Pipelines`` dependency, versions as (optionally
``>=`` / ``<=`` / ``==`` prefixed) semantic versions, ``lastVerified`` an RFC 3339 time no older
than a year, and ``OWNERS`` with at least one approver.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
COMPONENTS = sorted(p.parent for p in (ROOT / "components").glob("*/component.py"))
NAMES = [d.name for d in COMPONENTS]

REQUIRED = {"name": str, "tier": str, "stability": str, "dependencies": dict, "lastVerified": datetime}
OPTIONAL = {"tags": list, "ci": dict, "links": dict}
TIERS = ("core", "third_party")
STABILITY = ("experimental", "alpha", "beta", "stable")
SEMVER = re.compile(r"^(>=|<=|==)?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")


def _metadata(d: Path) -> dict:
    return yaml.safe_load((d / "metadata.yaml").read_text())


def test_the_components_are_found():
    assert {"sample_data", "search_mask", "register", "promote"} <= set(NAMES)


@pytest.mark.parametrize("d", COMPONENTS, ids=NAMES)
def test_layout(d):
    files = ("component.py", "component.yaml", "README.md", "metadata.yaml", "OWNERS")
    missing = [f for f in files if not (d / f).is_file()]
    assert not missing, f"{d.name} lacks {missing}"


def test_every_component_has_tests():
    lacking = [d.name for d in COMPONENTS if not list((d / "tests").glob("test_*.py"))]
    assert not lacking, f"components without tests/test_*.py: {lacking}"


@pytest.mark.parametrize("d", COMPONENTS, ids=NAMES)
def test_metadata_keys_and_types(d):
    meta = _metadata(d)
    assert [k for k in meta if k in REQUIRED] == list(REQUIRED), "required keys, in the catalog's order"
    assert not set(meta) - set(REQUIRED) - set(OPTIONAL), "a key the catalog does not know"
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        assert key not in meta or isinstance(meta[key], kind), f"{key} must be a {kind.__name__}"
    assert meta["tier"] in TIERS and meta["stability"] in STABILITY
    assert all(isinstance(t, str) and t for t in meta.get("tags", [])), "tags are strings"


@pytest.mark.parametrize("d", COMPONENTS, ids=NAMES)
def test_metadata_name_is_the_directory_and_the_component_function(d):
    name = _metadata(d)["name"]
    assert name == d.name
    spec = yaml.safe_load((d / "component.yaml").read_text())
    assert spec["pipelineInfo"]["name"] == name.replace("_", "-")
    (executor,) = spec["deploymentSpec"]["executors"].values()
    args = executor["container"]["args"]
    assert args[args.index("--function_to_execute") + 1] == name
    component = getattr(importlib.import_module(f"e3prune_components.{name}.component"), name)
    assert component.python_func.__name__ == name


@pytest.mark.parametrize("d", COMPONENTS, ids=NAMES)
def test_metadata_dependencies_and_date(d):
    meta = _metadata(d)
    deps = meta["dependencies"]
    assert set(deps) <= {"kubeflow", "external_services"} and isinstance(deps["kubeflow"], list)
    assert any(dep["name"] == "Pipelines" for dep in deps["kubeflow"]), "the Kubeflow Pipelines dependency"
    for dep in deps["kubeflow"] + (deps.get("external_services") or []):
        assert isinstance(dep["name"], str) and dep["name"], dep
        assert isinstance(dep["version"], str) and SEMVER.match(dep["version"]), dep
    verified = meta["lastVerified"]
    assert verified.tzinfo is not None, "lastVerified is an RFC 3339 time, e.g. 2026-12-04T00:00:00Z"
    assert timedelta(0) <= datetime.now(UTC) - verified < timedelta(days=365), "verified within the last year"


@pytest.mark.parametrize("d", COMPONENTS, ids=NAMES)
def test_metadata_links_point_at_files_of_the_repository(d):
    links = _metadata(d).get("links", {})
    assert "documentation" in links
    for key, target in links.items():
        assert isinstance(target, str) and (d / target).resolve().is_file(), f"links.{key}: {target}"


@pytest.mark.parametrize("d", COMPONENTS, ids=NAMES)
def test_owners_has_approvers(d):
    owners = yaml.safe_load((d / "OWNERS").read_text())
    assert set(owners) <= {"approvers", "reviewers", "labels", "emeritus_approvers"}
    assert owners["approvers"] and all(isinstance(a, str) and a for a in owners["approvers"])
    assert all(isinstance(r, str) and r for r in owners.get("reviewers") or [])


def test_package_data_ships_the_catalog_files():
    """pyproject's package-data for ``e3prune_components`` matches every catalog file."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["e3prune_components"]
    for d in COMPONENTS:
        assert f"e3prune_components.{d.name}" in pyproject["tool"]["setuptools"]["packages"]
        for f in ("component.yaml", "README.md", "metadata.yaml", "OWNERS"):
            assert any(fnmatch.fnmatch(f"{d.name}/{f}", p) for p in patterns), f"{d.name}/{f} is not shipped"
