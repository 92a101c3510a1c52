"""Sphinx configuration of the flask-nachocode manual (English, with a Korean translation).

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``
Korean: ``sphinx-build -W --keep-going -b html -D language=ko docs docs/_build/html-ko``
"""

from __future__ import annotations

from importlib.metadata import version as _version

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.locale import _

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

# Code blocks are messages too, so that their comments are translated (the code is kept).
gettext_additional_targets = ["literal-block"]

exclude_patterns = ["_build", "locale", "README.md"]
templates_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True

# Alabaster, which Sphinx ships. Its own words ("Related Topics", "Previous", ...) and
# the permalink titles have no Korean in Sphinx's catalog: locale/ko/LC_MESSAGES/sphinx.po
# adds them (Sphinx reads a sphinx.po in locale_dirs over its own), with the subtitle below.
html_theme = "alabaster"
html_theme_options = {
    "description": "Nachocode webhooks for Flask",
    "fixed_sidebar": True,
}
html_title = f"flask-nachocode {release}"
# searchbox.html instead of alabaster's searchfield.html, whose placeholder is fixed English;
# donate.html is empty without a donation link.
html_sidebars = {"**": ["about.html", "searchbox.html", "navigation.html", "relations.html"]}
html_show_sphinx = False  # alabaster's "Powered by" line is fixed English


def _translate_theme_text(app: Sphinx, config: Config) -> None:
    # Theme options are plain strings; translate them with the theme's own words.
    config.html_theme_options = {
        **config.html_theme_options,
        "description": _(config.html_theme_options["description"]),
    }
    config.copyright = _(config.copyright)


def setup(app: Sphinx) -> None:
    app.connect("config-inited", _translate_theme_text)
