"""setuptools reads everything from pyproject.toml; this file adds one check to the build.

A wheel without bpf/mlsched.bpf.o installs a loader that cannot attach, so `pip install .`
stops with one line naming `make bpf`. setup.py, because a build_py subclass is setuptools' own
hook into the build and pyproject.toml cannot declare one without importing from the tree.
Editable installs (`pip install -e .`, scripts/setup.sh before `make bpf`) are exempt: they
read the checkout's bpf/, where the loader names `make bpf` itself when the object is missing.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import FileError

BUILT = ("bpf/mlsched.bpf.o", "bpf/mlsched.bpf.enums")  # `make bpf`'s outputs, package data


class BuildPy(build_py):
    def run(self) -> None:
        root = Path(__file__).resolve().parent
        missing = [f for f in BUILT if not (root / f).is_file()]
        if missing and not self.editable_mode:
            raise FileError(f"{' and '.join(missing)} not built: run `make bpf` before "
                            "`pip install .`")
        super().run()


setup(cmdclass={"build_py": BuildPy})
