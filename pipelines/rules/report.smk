# Aggregate a grid's runs into one metrics file (results/metrics/<grid>.json) and its run list,
# then build the tables, figures and REPORT.md (paper_tables/<grid>/). For `paper`, each of its
# grids (cifar100, cifar10, imagenet) gets its own.


rule aggregate:
    input:
        lambda w: grid_run_files(w.grid, ["metrics.json", "eval.json"]),
    output:
        metrics=G.metrics_file("{grid}"),
        expected=G.expected_file("{grid}"),
        summary=directory(G.summary_dir("{grid}")),
    params:
        grid=lambda w: GRID.ref if w.grid == GRID.name else w.grid,
    log:
        G.log_file("{grid}", "aggregate"),
    conda:
        ENV
    shell:
        "maskconnect grid collect --grid {params.grid} --out {output.metrics} --expected-out {output.expected} "
        "--summary-dir {output.summary} > {log} 2>&1"


rule report:
    input:
        metrics=G.metrics_file("{grid}"),
        expected=G.expected_file("{grid}"),
    output:
        # `snakemake --report report.zip`: REPORT.md, the tables (Markdown; LaTeX as files) and the
        # figures, by grid, then dataset and kind, each with a caption (pipelines/report/result.rst)
        report(
            directory(G.tables_dir("{grid}")),
            patterns=[
                "{doc,REPORT}.md",
                "tables/{table,[^/]+}.md",
                "tables/{table,[^/]+}.tex",
                "figures/{kind,fanin|curves|masks|mask_dynamics}_{name,[^/]+}.png",
            ],
            caption="../report/result.rst",
            category="{grid}",
            subcategory=report_subcategory,
            labels=report_labels,
        ),
    log:
        G.log_file("{grid}", "report"),
    conda:
        ENV
    shell:
        "maskconnect report --results results --out {output} --grid {wildcards.grid} --expected {input.expected} > {log} 2>&1"
