"""The ``batchnorm`` command line: ``batchnorm lab`` and ``batchnorm bench``."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Batch Normalization, exact and fast: measure BN's claims (lab), time the kernels (bench).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """batchnorm: the lab and the benchmarks."""
