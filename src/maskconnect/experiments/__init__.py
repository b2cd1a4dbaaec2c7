"""Experiment grids: the one definition of which runs a pipeline trains, where every file lives, and
the command of every pipeline step.

=============  =======================================================================================
``grid``       :class:`Grid` and :class:`Run` (one training run: model, K, seed, how to train it)
``loading``    :func:`load_grid`: read a grid file, validate it (schema, then meaning), expand it
``paths``      the name and path of every file: :func:`run_id` and its parser, run directories, markers
``commands``   the command of each step (prepare, tracking, preflight, train, evaluate, aggregate, ...)
``inputs``     what each step's result depends on: a run's resolved config, the recipe keys it reads, code
``dvc``        dvc.yaml generated from a grid
=============  =======================================================================================

Both workflow engines read this package, never restate it: the Snakefile imports it
(``from maskconnect import experiments as G``) for its targets and runs the commands built here, and
``dvc.yaml`` is generated from it (``maskconnect grid dvc --grid demo > dvc.yaml``); a test checks
that the committed file equals the generated one. Imports neither torch nor the workflow engines.
"""

from __future__ import annotations

from .commands import (aggregate_command, check_pipeline_config, evaluate_command, launcher, needs_preflight,
                       preflight_command,
                       prepare_command, report_command, tracking_init_command, tracking_report_command,
                       tracking_sync_command, train_command)
from .dvc import dvc_plots, dvc_stages, dvc_yaml
from .inputs import code_deps, code_digest, config_digest, recipe_params, recipes_file, run_config
from .grid import (DEFAULT_GRID, GRIDS_DIR, SCHEMA_PATH, SETTINGS_DEFAULTS, TRAIN_OPTIONS, Grid, Run,
                   available_grids, grid_path, keffect_series)
from .loading import load_grid, train_config
from .paths import (DATA_DIR, RESULTS, RUN_DIR_PATTERN, RUN_ID_REGEX, RUNS_ROOT, TABLES, benchmark_file,
                    config_metrics_file, config_of, data_marker, expected_file, keffect_file, log_file,
                    metrics_file, parse_run_id, preflight_record, report_marker, run_dir, run_id, summary_dir,
                    sync_marker, tables_dir, tracking_marker)

__all__ = [
    "Grid", "Run", "load_grid", "available_grids", "grid_path", "keffect_series", "DEFAULT_GRID", "GRIDS_DIR",
    "SCHEMA_PATH", "SETTINGS_DEFAULTS", "TRAIN_OPTIONS",
    "run_id", "parse_run_id", "RUN_ID_REGEX", "RUN_DIR_PATTERN", "config_of", "run_dir", "RESULTS", "RUNS_ROOT",
    "TABLES", "DATA_DIR", "data_marker", "tracking_marker", "sync_marker", "report_marker", "metrics_file",
    "expected_file", "summary_dir", "config_metrics_file", "keffect_file", "tables_dir", "log_file",
    "preflight_record", "benchmark_file",
    "check_pipeline_config", "launcher", "prepare_command", "tracking_init_command", "needs_preflight", "preflight_command",
    "train_command", "evaluate_command", "aggregate_command", "report_command", "tracking_sync_command",
    "tracking_report_command",
    "dvc_stages", "dvc_plots", "dvc_yaml",
    "train_config", "run_config", "config_digest", "recipe_params", "recipes_file", "code_deps", "code_digest",
]
