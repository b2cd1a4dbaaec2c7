# MaskConnect pipeline: prepare data, train every run of an experiment grid, evaluate each run
# (final and pruned model: accuracy, parameters, FLOPs), aggregate, report, and mirror it all in
# MLflow.
#
#     snakemake --cores all                          # the demo grid: digits, CPU, < 10 min on 2 cores
#     snakemake --cores all --config grid=cifar100   # a paper grid (GPUs; see profiles/)
#     snakemake -n --config grid=paper               # what would run (109 training jobs)
#
# A grid whose runs go to a GPU first runs `maskconnect preflight` (pipelines/rules/preflight.smk):
# every training job waits for its record, and a failed check stops the pipeline before any training.
# --config preflight=false skips it, preflight=true forces it (e.g. on the CPU demo).
#
# The grid (src/maskconnect/grids/<name>.yaml) is the one definition of the runs; this workflow
# and dvc.yaml (generated: `maskconnect grid dvc`) only read it. Every rule runs one command of the
# suite's CLI, built by the package (maskconnect.experiments: commands.py), where it is tested.
# Outputs: run directories in results/runs/<grid>/, tables and figures in paper_tables/<grid>/,
# logs in results/logs/, training benchmarks in results/benchmarks/, MLflow in results/mlflow.db.

from snakemake.utils import min_version

min_version("8.10")


configfile: "pipelines/config.yaml"


# `snakemake --report report.zip` (or .html): the tables, figures and REPORT.md of every grid report
report: "pipelines/report/workflow.rst"


include: "pipelines/rules/common.smk"
include: "pipelines/rules/data.smk"
include: "pipelines/rules/tracking.smk"
include: "pipelines/rules/preflight.smk"
include: "pipelines/rules/train.smk"
include: "pipelines/rules/evaluate.smk"
include: "pipelines/rules/report.smk"


# Light steps stay on the machine that runs Snakemake under a cluster executor (the login node
# also has the internet access a dataset download needs); training and evaluation are submitted.
localrules:
    all,
    prepare_data,
    tracking_init,
    tracking_sync,
    tracking_report,
    aggregate,
    report,


rule all:
    input:
        all_targets(),
    default_target: True
