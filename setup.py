"""The optional C helper that starts commands; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cloudops_execution_engine.actors._spawn",
            sources=["cloudops_execution_engine/actors/_spawn.c"],
            # Without a C compiler the package installs all the same and starts
            # commands with fork and execve from Python.
            optional=True,
        )
    ]
)
