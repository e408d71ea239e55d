"""The optional C parts that start commands; everything else is in pyproject.toml.

`_spawn` is an extension module (vfork and execve from the worker). `_spawner` is
a small program each worker runs, so that commands start from its small address
space (see `actors/spawner.py`). Without a C compiler the package installs all
the same and starts commands with fork and execve from Python.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ACTORS = os.path.join("cloudops_execution_engine", "actors")


class BuildWithSpawner(build_ext):
    def run(self) -> None:
        super().run()
        try:
            objects = self.compiler.compile([os.path.join(ACTORS, "_spawner.c")], output_dir=self.build_temp)
            root = "." if self.inplace else self.build_lib
            self.compiler.link_executable(objects, "_spawner", output_dir=os.path.join(root, ACTORS))
        except Exception as exc:  # optional, as the extension is
            self.warn(f"the spawner was not built ({exc}); commands start from the worker")


setup(
    cmdclass={"build_ext": BuildWithSpawner},
    ext_modules=[
        Extension(
            "cloudops_execution_engine.actors._spawn",
            sources=[os.path.join(ACTORS, "_spawn.c")],
            depends=[os.path.join(ACTORS, "_child.h")],
            optional=True,
        )
    ],
)
