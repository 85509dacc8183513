"""``batchnorm lab``: the command that measures BN's claims and writes the report."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .data import DATASETS, DataError
from .experiment import PROFILES
from .experiments import select
from .output import OutputError
from .runner import run_lab


def lab_command(
    profile: Annotated[str, typer.Option(help="quick (the default, a few minutes), full (closer to the papers), or smoke (seconds, for tests).")] = "quick",
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Run only this claim (e.g. C1); repeat for more.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder: results.json, index.html, figures/, data/, runs/.")] = Path("lab-report"),
    data: Annotated[str, typer.Option(help=f"Data set: {', '.join(DATASETS)}.")] = "mnist1d",
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder with the files of mnist, fashion-mnist or cifar10.")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Number of seeds for every experiment (default: the profile's).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Redo every training run instead of reusing stored ones.")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite the report of another run (other claims, profile or data) in --out.")] = False,
) -> None:
    """Measure what Batch Normalization does (the claims of docs/claims.md) and write an HTML report."""
    if profile not in PROFILES:
        raise typer.BadParameter(f"expected one of {', '.join(PROFILES)}, got {profile!r}", param_hint="--profile")
    if data not in DATASETS:
        raise typer.BadParameter(f"expected one of {', '.join(DATASETS)}, got {data!r}", param_hint="--data")
    if seeds is not None and seeds < 1:
        raise typer.BadParameter(f"expected at least 1, got {seeds}", param_hint="--seeds")
    try:
        select(only)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--only") from e
    console = Console()
    parts = ["batchnorm", "lab", "--profile", profile, "--data", data, "--out", str(out)]
    parts += [a for claim in only or [] for a in ("--only", claim)]
    parts += ["--data-dir", str(data_dir)] if data_dir else []
    parts += ["--seeds", str(seeds)] if seeds is not None else []
    try:
        run_lab(out, profile=profile, only=only, data=data, data_dir=data_dir, seeds=seeds, fresh=fresh,
                console=console, command=shlex.join(parts), replace=replace)
    except (DataError, OutputError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from e
    except KeyboardInterrupt:
        console.print(f"\n[yellow]interrupted.[/] Finished runs are kept in {out / 'runs'}; run the same command again to resume.")
        raise typer.Exit(130) from None
