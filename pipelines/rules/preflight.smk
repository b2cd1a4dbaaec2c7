# The preflight (`maskconnect preflight`): before a grid spends GPU-days, prove on the machine that
# will train it that the device path computes what plain autograd computes (training step, 1x1
# backward, compiled step, data path, DDP), that a step fits in memory, and what the grid will cost.
# Every training job of the grid waits for its record; a failed check fails this job (exit 1), so
# nothing trains. Run for grids whose runs go to a GPU; `--config preflight=true|false` forces it.
# On SLURM it is one GPU job on the GPU partition.


rule preflight:
    output:
        G.preflight_record(GRID.name),
    params:
        cmd=G.preflight_command(GRID),
        code=CODE["train"],  # it proves the training step of this code
        attempts=G.log_file(GRID.name, "preflight").removesuffix(".log") + ".attempts.log",
    threads: 4
    resources:
        gpu=lambda w: 1 if any(r.gpus > 0 for r in GRID.runs) else 0,
        runtime=30,
        mem_mb=16000,
        slurm_partition=lambda w: slurm_partition(1 if any(r.gpus > 0 for r in GRID.runs) else 0),
    log:
        G.log_file(GRID.name, "preflight"),
    conda:
        ENV
    shell:
        "{params.cmd} 2>&1 | tee -a {params.attempts} > {log}"
