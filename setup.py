"""tvmrpc: a Twisted implementation of Apache TVM's RPC tracker, proxy and server."""

import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.egg_info import egg_info


class EggInfoWithoutTwisted(egg_info):
    """Write top_level.txt without ``twisted``: we ship one file in its plugin
    directory, we do not own the package (tools that read top_level.txt would
    otherwise think uninstalling tvmrpc removes Twisted)."""

    def run(self) -> None:
        super().run()
        path = os.path.join(self.egg_info, "top_level.txt")
        with open(path, encoding="utf-8") as handle:
            names = [name for name in handle.read().split() if name != "twisted"]
        self.write_file("top-level names", path, "\n".join(sorted(names)) + "\n")


setup(
    name="tvmrpc",
    version="0.1.0",
    description="Twisted implementation of Apache TVM's RPC tracker, proxy and server",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        *find_packages(include=["tvmrpc", "tvmrpc.*", "crossbuild", "crossbuild.*"]),
        "twisted.plugins",
    ],
    package_data={
        "twisted": ["plugins/tvmrpc_plugins.py"],
        "crossbuild": ["toolchains/*.cmake", "templates/*"],
        "tvmrpc.systemd": ["units/*"],
    },
    install_requires=[
        "twisted[tls]>=23.10",  # pyOpenSSL, service_identity: --listen ssl:, --tracker tls:
        "attrs>=22.2",
        "service-identity>=21.1",
        "prometheus_client>=0.17",
    ],
    extras_require={
        "tvm": ["apache-tvm", "numpy"],
        "websocket": ["autobahn>=23.1"],
        # Host-side only (the board never runs crossbuild, so these stay out of
        # install_requires and out of the board's bundle).
        "crossbuild": ["pyelftools", "packaging>=22"],
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
            "packaging>=22",
            "cmake>=3.26",
            "selenium>=4.11",
            "build",
        ],
        # The lint step: ruff (check and format) and mypy with the zope.interface plugin.
        "dev": ["ruff>=0.5", "mypy>=1.10", "mypy-zope>=1.0", "types-pyOpenSSL"],
    },
    entry_points={
        "console_scripts": [
            "tvmrpc = tvmrpc.cli:main",
            "tvmrpc-crossbuild = crossbuild.__main__:main",
            # What the systemd units run: twistd --nodaemon --pidfile= tvm-<daemon> ARGS.
            "tvm-tracker = tvmrpc.systemd.launch:tracker",
            "tvm-proxy = tvmrpc.systemd.launch:proxy",
            "tvm-server = tvmrpc.systemd.launch:server",
        ]
    },
    cmdclass={"egg_info": EggInfoWithoutTwisted},
    license="Apache-2.0",
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
