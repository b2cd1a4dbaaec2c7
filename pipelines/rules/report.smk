# Aggregate a grid's runs into one metrics file (results/metrics/<grid>.json) and its run list,
# then build the tables, figures and REPORT.md (paper_tables/<grid>/). For `paper`, each of its
# grids (cifar100, cifar10, imagenet) gets its own.


rule aggregate:
    input:
        lambda w: grid_run_files(w.grid, ["metrics.json", "eval.json"]),
    output:
        metrics=G.metrics_file("{grid}"),
        expected=G.expected_file("{grid}"),
    params:
        grid=lambda w: GRID.ref if w.grid == GRID.name else w.grid,
    log:
        G.log_file("{grid}", "aggregate"),
    conda:
        ENV
    shell:
        "maskconnect grid collect --grid {params.grid} --out {output.metrics} --expected-out {output.expected} > {log} 2>&1"


rule report:
    input:
        metrics=G.metrics_file("{grid}"),
        expected=G.expected_file("{grid}"),
    output:
        directory(G.tables_dir("{grid}")),
    log:
        G.log_file("{grid}", "report"),
    conda:
        ENV
    shell:
        "maskconnect report --results results --out {output} --grid {wildcards.grid} --expected {input.expected} > {log} 2>&1"
