"""Installs swav_vissl_plugin, its configs and its hydra search-path plugin.

VISSL 0.1.6 pins packages that do not install on Python 3.11; it is therefore
not a declared dependency here but installed with --no-deps by the Makefile,
after the tested set in constraints.txt (see README "Install").
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Makes the installed configs folder a regular package.

    The repository's top-level ``configs/`` has no ``__init__.py`` on purpose:
    with the repository on ``sys.path`` it would shadow VISSL's own top-level
    ``configs`` package, which hydra reads as ``pkg://configs``.
    """

    def run(self):
        super().run()
        init = os.path.join(self.build_lib, "swav_vissl_plugin", "configs", "__init__.py")
        os.makedirs(os.path.dirname(init), exist_ok=True)
        with open(init, "w") as f:
            f.write('"""The plugin\'s hydra configs (installed from the repository\'s configs/)."""\n')

setup(
    name="swav_vissl_plugin",
    version="0.1.0",
    description="SwAV, DeepCluster-v2 and SeLa-v2 as a VISSL plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["swav_vissl_plugin", "swav_vissl_plugin.*"])
    + ["swav_vissl_plugin.configs", "hydra_plugins.swav_vissl_plugin_searchpath"],
    # The configs live at the top level of the repository (configs/config/...)
    # and are installed inside the package, so VISSL's own top-level
    # `configs` package is never shadowed.
    package_dir={"swav_vissl_plugin.configs": "configs"},
    package_data={"swav_vissl_plugin.configs": ["config/**/*.yaml", "config/**/*.md"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "hydra-core>=1.3,<1.4",
        "classy-vision==0.7.0",
        "fvcore",
        "iopath",
        "submitit",
        "numba",
        "setuptools<81",
    ],
    cmdclass={"build_py": BuildPy},
    entry_points={"console_scripts": ["swav-vissl-run=swav_vissl_plugin.launcher:main"]},
)
