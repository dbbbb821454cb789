"""
Build steps setup.cfg cannot declare: the man pages.

setup.cfg stays the source of the metadata.  This file adds C{build_man},
a sub-command of C{build} that renders docs/man/NAME.SECTION.rst with
docutils' manpage writer into build/man/manSECTION/NAME.SECTION, and
installs those files as data files under C{share/man/manSECTION} of the
environment (a venv's C{.venv/share/man}, C{/usr/local/share/man}...).
docutils is a build requirement (pyproject.toml).
"""

from __future__ import annotations

import glob
import os
from typing import Any

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.command.editable_wheel import editable_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(glob.glob(os.path.join("docs", "man", "*.rst"), root_dir=HERE))
OUT = os.path.join("build", "man")


def page_of(source: str) -> tuple[str, str]:
    """docs/man/mailhub.toml.5.rst -> ("man5", "mailhub.toml.5")."""
    name = os.path.basename(source)[: -len(".rst")]
    return "man" + name.rsplit(".", 1)[1], name


class build_man(Command):
    """Render the man pages (docs/man/*.rst) with docutils' manpage writer."""

    description = "render docs/man/*.rst into build/man with docutils"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        from docutils.core import publish_file
        from docutils.writers import manpage

        for source in SOURCES:
            section, name = page_of(source)
            target = os.path.join(HERE, OUT, section, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # any docutils warning stops the build: a page must render cleanly
            publish_file(
                source_path=os.path.join(HERE, source),
                destination_path=target,
                writer=manpage.Writer(),
                settings_overrides={"report_level": 2, "halt_level": 2, "output_encoding": "utf-8"},
            )


class build_with_man(build):
    sub_commands = [("build_man", None), *build.sub_commands]


class editable_wheel_with_man(editable_wheel):
    """
    C{pip install -e}: setuptools' editable wheel skips data files (it asks
    the distribution for C{has_data}, which does not exist), so the man
    pages are installed here, into the wheel's data directory it set up.
    """

    def _run_build_commands(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._run_build_commands(*args, **kwargs)
        self.run_command("install_data")
        return result


def data_files() -> list[tuple[str, list[str]]]:
    by_section: dict[str, list[str]] = {}
    for source in SOURCES:
        section, name = page_of(source)
        by_section.setdefault(section, []).append(os.path.join(OUT, section, name))
    return [(os.path.join("share", "man", section), files) for section, files in sorted(by_section.items())]


setup(
    cmdclass={"build": build_with_man, "build_man": build_man, "editable_wheel": editable_wheel_with_man},
    data_files=data_files(),
)
