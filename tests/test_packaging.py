"""The release metadata tells the truth: one version, typed, and the version ranges we
declare are the ones .ci/matrix tests at both ends."""

from __future__ import annotations

from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import flask_nachocode

CI = Path(__file__).parent.parent / ".ci"


def declared() -> dict[str, Requirement]:
    """Requirements of the installed distribution: core ones and the `postgres` extra."""
    found = {}
    for line in requires("flask-nachocode") or []:
        requirement = Requirement(line)
        core = requirement.marker is None
        if core or requirement.marker.evaluate({"extra": "postgres"}):
            found[canonicalize_name(requirement.name)] = requirement
    return found


def pins(name: str) -> dict[str, Version]:
    pinned = {}
    for line in (CI / f"constraints-{name}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, _, exact = line.partition("==")
            pinned[canonicalize_name(package)] = Version(exact)
    return pinned


def test_version_is_single_sourced() -> None:
    assert flask_nachocode.__version__ == version("flask-nachocode")


def test_package_is_marked_typed() -> None:
    assert (Path(flask_nachocode.__file__).parent / "py.typed").is_file()


def test_every_dependency_has_a_lower_and_an_upper_bound() -> None:
    for name, requirement in declared().items():
        if name == "psycopg":  # optional driver: a floor only, any newer psycopg 3 works
            continue
        operators = {spec.operator for spec in requirement.specifier}
        assert {">=", "<"} <= operators, requirement


@pytest.mark.parametrize("name", sorted(declared()))
def test_oldest_constraints_pin_each_lower_bound(name: str) -> None:
    (floor,) = (Version(s.version) for s in declared()[name].specifier if s.operator == ">=")
    assert pins("oldest")[name] == floor


@pytest.mark.parametrize("name", sorted(declared()))
def test_newest_constraints_are_inside_the_ranges(name: str) -> None:
    newest = pins("newest")[name]
    assert declared()[name].specifier.contains(newest), (name, newest)
    assert newest > pins("oldest")[name]
