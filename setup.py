"""tvmrpc: a Twisted implementation of Apache TVM's RPC tracker, proxy and server."""

from setuptools import find_packages, setup

setup(
    name="tvmrpc",
    version="0.1.0",
    description="Twisted implementation of Apache TVM's RPC tracker, proxy and server",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tvmrpc", "tvmrpc.*", "crossbuild", "crossbuild.*"])
    + ["twisted.plugins"],
    package_data={
        "twisted": ["plugins/tvmrpc_plugins.py"],
        "crossbuild": ["toolchains/*.cmake", "templates/*"],
    },
    install_requires=[
        "twisted>=23.10",
        "attrs>=22.2",
        "service-identity>=21.1",
    ],
    extras_require={
        "tvm": ["apache-tvm", "numpy"],
        "websocket": ["autobahn>=23.1"],
        "crossbuild": ["pyelftools"],
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "apache-tvm",
            "numpy",
            "tornado",
            "cloudpickle",
            "autobahn>=23.1",
            "psutil",
            "pyelftools",
            "cmake>=3.26",
        ],
        "dev": ["ruff>=0.5"],
    },
    entry_points={
        "console_scripts": [
            "tvmrpc = tvmrpc.cli:main",
            "tvmrpc-crossbuild = crossbuild.__main__:main",
        ]
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
