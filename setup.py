"""Build hook: wheels carry the shipped model as package data.

The repository keeps one copy of each shipped model, in ``checkpoints/`` (listed in
``MANIFEST.in`` so that an sdist has it too). ``build_py`` copies the files it needs to run
into the built package as ``flashjax/_shipped/<name>/``, which ``flashjax.shipped`` looks in
first. An editable install copies nothing: it finds ``checkpoints/`` next to the source.
Everything else is configured in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = [Path("checkpoints") / name for name in ("flashjax-docs-9m", "flashjax-docs-llama-9m")]
# README figures only; every other file (weights, tokenizer, predictors, json reports) goes in
NOT_PACKAGED = ("*.png",)


class BuildPyWithShippedModel(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        for shipped in SHIPPED:
            src = Path(__file__).resolve().parent / shipped
            if not (src / "config.json").is_file():
                raise FileNotFoundError(f"{src / 'config.json'} is missing: a wheel built "
                                        f"without it would lack that shipped model")
            dst = Path(self.build_lib) / "flashjax" / "_shipped" / shipped.name
            shutil.rmtree(dst, ignore_errors=True)  # no stale files from an earlier build
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*NOT_PACKAGED))


setup(cmdclass={"build_py": BuildPyWithShippedModel})
