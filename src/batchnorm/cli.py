"""The ``batchnorm`` command line: ``batchnorm lab``, ``batchnorm bench`` and
``batchnorm warmup``."""

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


@app.command("warmup")
def warmup_command() -> None:
    """Compile every CPU kernel now (float32 and float64) into numba's cache, so that no
    later process waits for compilation on its first training step."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console()
    try:
        from batchnorm.kernels.cpu import warmup as cpu_warmup
    except ImportError as err:  # numba missing, or no writable cache directory
        console.print(f"the CPU kernels are not available here: {err}")
        raise typer.Exit(1) from err
    import numba

    cases = list(cpu_warmup.cases())
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("compiling", total=len(cases))

        def done(label: str, seconds: float) -> None:
            console.print(f"{label}: {seconds:.1f} s")
            progress.advance(task)

        total = cpu_warmup.warm_up(done)
    where = numba.config.CACHE_DIR or "__pycache__ beside batchnorm/kernels"
    console.print(f"CPU kernels ready in {total:.1f} s (cache: {where})")
