"""``maskconnect grid``: list a grid's runs, check grid files, generate dvc.yaml, aggregate metrics.

The logic lives in :mod:`maskconnect.experiments` (which the Snakefile imports) and the aggregation in
:mod:`maskconnect.report.aggregate`; this is their command line.
"""

from __future__ import annotations

import json
import sys

from ..experiments import DEFAULT_GRID, available_grids, dvc_yaml, load_grid


def _cmd_list(args) -> int:
    grid = load_grid(args.grid)
    if args.format == "json":
        from dataclasses import asdict

        print(json.dumps([{**asdict(r), "train": dict(r.train), "run_id": r.run_id, "run_dir": r.run_dir}
                          for r in grid.runs], indent=2))
    else:
        for r in grid.runs:
            print(r.run_id if args.format == "ids" else r.run_dir)
    return 0


def _cmd_check(args) -> int:
    for name in args.grid or available_grids():
        grid = load_grid(name)
        kinds = {}
        for r in grid.runs:
            kinds[r.connectivity] = kinds.get(r.connectivity, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in kinds.items())
        print(f"grid {grid.name!r} ({grid.path}): {len(grid.runs)} training runs ({what}); "
              f"results/runs/{'{' + ','.join(grid.parts) + '}' if len(grid.parts) > 1 else grid.parts[0]}")
    return 0


def _cmd_dvc(args) -> int:
    text = dvc_yaml(load_grid(args.grid))
    if args.out:
        from ..io import atomic_write_text

        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_collect(args) -> int:
    from ..io import atomic_write_json, atomic_write_text
    from ..report.aggregate import collect

    grid = load_grid(args.grid)
    result = collect(grid)
    if args.out:
        atomic_write_json(args.out, result)
    else:
        print(json.dumps(result, indent=2))
    if args.expected_out:
        atomic_write_text(args.expected_out, "".join(f"{r.run_id}\n" for r in grid.runs))
    if args.summary_dir:
        from ..report.compact import write_summary

        part = grid.parts[0] if len(grid.parts) == 1 else grid.name
        write_summary(grid, part, result, args.summary_dir)
    from ..report.projection import lines

    for line in lines(result["timing"]):
        print(line, file=sys.stderr)
    print(f"grid {grid.name!r}: {result['runs_complete']} of {result['runs_expected']} runs complete"
          + (f"; missing: {', '.join(result['missing'])}" if result["missing"] else ""), file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``maskconnect grid`` to the command line."""
    p = sub.add_parser("grid", help="experiment grids: list runs, check grid files, generate dvc.yaml, aggregate",
                       description="Experiment grids (src/maskconnect/grids/*.yaml): the one definition the "
                                   "Snakefile and dvc.yaml read. GRID is a packaged name (" + ", ".join(available_grids())
                                   + ") or a path to a grid file.")
    gsub = p.add_subparsers(dest="grid_command", metavar="ACTION")
    gsub.required = True
    q = gsub.add_parser("list", help="the grid's runs: run directories (default), run ids, or JSON records")
    q.add_argument("--grid", default=DEFAULT_GRID, help=f"grid name or file (default {DEFAULT_GRID})")
    q.add_argument("--format", choices=["dirs", "ids", "json"], default="dirs")
    q.set_defaults(func=_cmd_list)
    q = gsub.add_parser("check", help="validate grid files (all packaged grids by default); exit 2 naming the bad entry")
    q.add_argument("--grid", action="append", help="grid name or file (repeatable)")
    q.set_defaults(func=_cmd_check)
    q = gsub.add_parser("dvc", help="print dvc.yaml for a grid (maskconnect grid dvc --grid demo > dvc.yaml)")
    q.add_argument("--grid", default=DEFAULT_GRID, help=f"grid name or file (default {DEFAULT_GRID})")
    q.add_argument("--out", help="write this file instead of printing")
    q.set_defaults(func=_cmd_dvc)
    q = gsub.add_parser("collect", help="aggregate a grid's metrics.json and eval.json files into one JSON")
    q.add_argument("--grid", default=DEFAULT_GRID, help=f"grid name or file (default {DEFAULT_GRID})")
    q.add_argument("--out", help="JSON file to write (default: print)")
    q.add_argument("--expected-out", dest="expected_out", help="also write the grid's run ids here, one per line")
    q.add_argument("--summary-dir", dest="summary_dir",
                   help="also write the compact results here: a metrics file per configuration (top-1 mean, 95%% CI, "
                        "n, parameters train/test; DVC's metrics) and top-1 against K per model (CSV; DVC's plots)")
    q.set_defaults(func=_cmd_collect)
