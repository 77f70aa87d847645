"""clicklens: learn text-to-image search from image search click logs."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def requirements(name: str):
    """Requirement lines of a requirements file (the one list of the pinned stack)."""
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


setup(
    name="clicklens",
    version="0.1.0",
    description="Learn text-to-image retrieval from image search click logs (Beam, TF, NSL, TFRS, ScaNN, TF Serving).",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    # The core and the three stages; a container copies the core and its own stage only, and
    # find_packages installs what is there.
    packages=find_packages(include=["clicklens", "clicklens.*", "trainer", "trainer.*", "beam_pipelines",
                                    "beam_pipelines.*", "serving", "serving.*"]),
    package_data={"serving": ["static/*"], "clicklens": ["default_config.yaml"]},
    include_package_data=True,
    install_requires=requirements("requirements.txt"),
    extras_require={"test": requirements("requirements-test.txt")},
    entry_points={"console_scripts": ["clicklens=clicklens.cli:main",
                                      "clicklens-model-server=serving.model_server_main:main"]},
)
