# MLflow (results/mlflow.db unless $MLFLOW_TRACKING_URI is set). The store is created once, before
# any training job starts, so parallel jobs never race on MLflow's schema migration. Training jobs
# log their runs as they go; tracking_sync then re-syncs every run directory (idempotent: it
# repairs what a failed or offline tracker missed), and tracking_report logs the report folder.
# Browse: mlflow ui --backend-store-uri sqlite:///results/mlflow.db --host 127.0.0.1


rule tracking_init:
    output:
        G.tracking_marker(),
    params:
        cmd=G.tracking_init_command(),
    log:
        G.log_file("tracking", "tracking_init"),
    conda:
        ENV
    shell:
        "{params.cmd} 2> {log}"


rule tracking_sync:
    input:
        runs=lambda w: grid_run_files(w.grid, ["metrics.json"]),
        store=G.tracking_marker(),
    output:
        G.sync_marker("{grid}"),
    params:
        cmd=lambda w: G.tracking_sync_command(GRID, w.grid),
    log:
        G.log_file("{grid}", "tracking_sync"),
    conda:
        ENV
    shell:
        "{params.cmd} 2> {log}"


rule tracking_report:
    input:
        tables=G.tables_dir("{grid}"),
        synced=G.sync_marker("{grid}"),
    output:
        G.report_marker("{grid}"),
    params:
        cmd=lambda w: G.tracking_report_command(w.grid),
    log:
        G.log_file("{grid}", "tracking_report"),
    conda:
        ENV
    shell:
        "{params.cmd} > {log} 2>&1"
