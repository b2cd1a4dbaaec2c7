# Evaluate each finished run: the final model (frozen masks) and the pruned model, with parameters
# before and after pruning ("Params Train" / "Params Test") and FLOPs per image. Threads, memory,
# time limit and SLURM partition come from the run in the grid, as for training.


rule evaluate:
    input:
        run_file("metrics.json"),
    output:
        run_file("eval.json"),
    params:
        cmd=lambda w: G.evaluate_command(run_of(w)),
        attempts=lambda w: attempts_log("evaluate", w),
        code=CODE["evaluate"],
    threads: lambda w: run_of(w).threads
    resources:
        gpu=lambda w: min(run_of(w).gpus, 1),
        runtime=lambda w, attempt: runtime_of(run_of(w), attempt),
        mem_mb=lambda w: run_of(w).mem_mb or 4000,
        slurm_partition=lambda w: slurm_partition(min(run_of(w).gpus, 1)),
    log:
        G.log_file("{grid}", "evaluate", "{run}"),
    conda:
        ENV
    shell:
        "{params.cmd} 2>&1 | tee -a {params.attempts} > {log}"
