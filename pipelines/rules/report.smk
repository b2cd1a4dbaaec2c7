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
        cmd=lambda w: G.aggregate_command(GRID, w.grid),
        code=CODE["aggregate"],
    log:
        G.log_file("{grid}", "aggregate"),
    conda:
        ENV
    shell:
        "{params.cmd} > {log} 2>&1"


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
    params:
        cmd=lambda w: G.report_command(w.grid),
        code=CODE["report"],
    log:
        G.log_file("{grid}", "report"),
    conda:
        ENV
    shell:
        "{params.cmd} > {log} 2>&1"
