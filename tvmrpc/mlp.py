"""A small neural network (a relax MLP) compiled on the host and run remotely.

Used by ``tvmrpc demo``, the integration tests and the benchmarks, so every one
of them proves the same thing: a stock TVM client uploads a compiled model,
loads it on the remote device and gets numpy's answer back.

Host side only: this module needs the full TVM compiler and numpy, which the
daemons and the board never import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

IN_FEATURES = 16
HIDDEN = 32
OUT_FEATURES = 4
LIBRARY_NAME = "mlp.so"


#: What the host compiles for an aarch64 board (TVM 0.27 rejects "llvm -mtriple=...").
AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
AARCH64_CC = "aarch64-linux-gnu-g++"


def build_mlp(out_dir: Path, target: str | dict[str, Any] = "llvm", cc: str | None = None) -> Path:
    """Compile the MLP with relax for ``target`` and export it; return the library path.

    ``target`` is a TVM target string or dict (``AARCH64_TARGET`` for a board);
    ``cc`` the compiler that links the library (``AARCH64_CC``; default: the host's).
    """
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
            self.fc2 = nn.Linear(HIDDEN, OUT_FEATURES)

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return self.fc2(nn.relu(self.fc1(x)))

    spec = {"forward": {"x": nn.spec.Tensor((1, IN_FEATURES), "float32")}}
    module, _params = MLP().export_tvm(spec)
    executable = relax.build(module, target=tvm.target.Target(target))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LIBRARY_NAME
    if cc is None:
        executable.export_library(str(path))
    else:
        executable.export_library(str(path), cc=cc)
    return path


@attrs.frozen
class MLPInputs:
    """Deterministic input and weights; ``expected`` is numpy's answer."""

    arrays: tuple[Any, ...]  # x, w1, b1, w2, b2 in the order ``forward`` takes them
    expected: Any

    @classmethod
    def make(cls, seed: int = 0) -> MLPInputs:
        import numpy as np

        rng = np.random.default_rng(seed)

        def normal(*shape: int) -> Any:
            return rng.standard_normal(shape).astype("float32")

        x = normal(1, IN_FEATURES)
        w1, b1 = normal(HIDDEN, IN_FEATURES), normal(HIDDEN)
        w2, b2 = normal(OUT_FEATURES, HIDDEN), normal(OUT_FEATURES)
        expected = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
        return cls((x, w1, b1, w2, b2), expected)


@attrs.frozen
class MLPResult:
    output: Any
    expected: Any
    #: seconds per ``forward`` on the device (TVM's time_evaluator means), when asked
    run_seconds: tuple[float, ...] | None = None

    @property
    def ok(self) -> bool:
        import numpy as np

        return bool(np.allclose(self.output, self.expected, rtol=1e-4, atol=1e-4))


def run_mlp(
    session: Any, library: Path, inputs: MLPInputs | None = None, time_runs: int = 0
) -> MLPResult:
    """Upload ``library`` through a stock RPC ``session``, load it and run ``forward``.

    ``time_runs`` > 0 then also times ``forward`` there with TVM's
    ``time_evaluator``: 3 means of that many runs each.
    """
    import tvm
    from tvm import relax

    inputs = inputs or MLPInputs.make()
    session.upload(str(library))
    module = session.load_module(library.name)
    device = session.cpu()
    vm = relax.VirtualMachine(module, device)
    args = [tvm.runtime.tensor(a, device) for a in inputs.arrays]
    output = vm["forward"](*args).numpy()
    timed = None
    if time_runs > 0:
        timer = vm.time_evaluator("forward", device, number=time_runs, repeat=3)
        timed = tuple(float(t) for t in timer(*args).results)
    return MLPResult(output, inputs.expected, timed)
