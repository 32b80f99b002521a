"""``memdetect merge``: join the reports of a sharded scan."""

from __future__ import annotations

from typing import Annotated, List

import typer

from ..progress import plural
from .exits import EXIT_FLAGGED, EXIT_OK, _outputs, handle_errors
from .options import Quiet, ShardKeyFile
from .render import _p, err, out


@handle_errors
def merge(
    reports: Annotated[List[str], typer.Argument(help="The shards' reports (paths or fsspec URLs), from `memdetect "
                                                 "scan --shard I/N`.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="The joined report: .csv, .json or .parquet (a path "
                                        "or an fsspec URL).")],
    shard_key_file: ShardKeyFile = None,
    quiet: Quiet = False,
):
    """Join the reports of a sharded scan into the report one process would have written (refuses parts of
    different scans or settings, missing or duplicate shards, and edited marks; flags are recomputed from the
    scores; with a shard key, every shard's MAC must verify).

    Example: memdetect merge part-*.parquet --output report.parquet"""
    from ..workflows.merge import KEY_ENV, load_shard_key, merge_reports

    _outputs(output=output)
    res = merge_reports(reports, output, key=load_shard_key(shard_key_file))
    if not res.verified:  # said even with --quiet: what the merged report rests on
        err.print(f"note: no shard key ({KEY_ENV} or --shard-key-file): the shards are trusted as given (their rows "
                  f"are checked against each other, not authenticated)", soft_wrap=True)
    if not quiet:
        c = res.counts
        out.print(f"merged {res.parts} shards: {plural(c['images'], 'images')}: {c['scored']} scored, "
                  f"{c['errored']} errored, {c['flagged']} flagged memorized; report: {_p(res.output)}"
                  + ("; every shard's MAC verified" if res.verified else ""), soft_wrap=True)
    raise typer.Exit(EXIT_FLAGGED if res.flagged else EXIT_OK)
