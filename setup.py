"""Builds llp_fast. ``kernels/`` (Triton) is installed as ``llp_fast.kernels``."""

from setuptools import find_packages, setup

packages = find_packages(include=["llp_fast", "llp_fast.*"]) + ["llp_fast.kernels"]

setup(
    packages=packages,
    package_dir={"llp_fast.kernels": "kernels"},
)
