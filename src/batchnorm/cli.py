"""The ``batchnorm`` command line: ``batchnorm lab`` and ``batchnorm bench``."""

from __future__ import annotations

import typer

from batchnorm.bench import bench_command
from batchnorm.lab.cli import lab_command

app = typer.Typer(
    help="Batch Normalization, exact and fast: measure BN's claims (lab), time the kernels (bench).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """batchnorm: the lab and the benchmarks."""


app.command("lab")(lab_command)
app.command("bench")(bench_command)
