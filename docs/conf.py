"""Sphinx configuration of the flask-nachocode manual (English, with a Korean translation).

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``
Korean: ``sphinx-build -W --keep-going -b html -D language=ko docs docs/_build/html-ko``
"""

from __future__ import annotations

from importlib.metadata import version as _version

project = "flask-nachocode"
author = "flask-nachocode contributors"
copyright = "2025, flask-nachocode contributors"
release = _version("flask-nachocode")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

# The translation: one catalog per page (docs/locale/ko/LC_MESSAGES/<page>.po), so that a
# change to one page leaves the other pages' catalogs alone.
language = "en"
locale_dirs = ["locale/"]
gettext_compact = False
gettext_uuid = False
gettext_location = False
gettext_additional_targets = ["literal-block"]

exclude_patterns = ["_build", "locale", "README.md"]
templates_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True

html_theme = "alabaster"
html_theme_options = {
    "description": "Nachocode webhooks for Flask",
    "fixed_sidebar": True,
}
html_title = f"flask-nachocode {release}"
