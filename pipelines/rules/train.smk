# One job per run of the grid. `maskconnect train` resumes from the run's checkpoint.pt, which is
# deliberately not a declared output: Snakemake deletes the outputs of a job before running it,
# and a restarted workflow must find the checkpoint (no lost epochs). metrics.json, written
# atomically at the very end, is the output. When a run's training settings change (in the grid or
# its recipe's values in recipes.yaml), the job's params change, Snakemake re-runs it, and --replace
# moves the old run aside.
#
# GPU jobs reserve `gpu` resources (the workflow profile caps them at the GPUs present) and run
# under `maskconnect gpu-slot`, which picks free device ids (CUDA_VISIBLE_DEVICES); jobs with more
# than one GPU run torchrun, one process per GPU.
#
# On SLURM (profiles/slurm): GPU jobs go to the GPU partition, the others to the CPU one; a retry
# gets the grid's runtime times its attempt number; the log holds the last attempt and
# <run>.attempts.log every attempt (a killed attempt's output is kept).


rule train:
    input:
        data=lambda w: ancient(G.data_marker(run_of(w).dataset)),
        store=ancient(G.tracking_marker()),
        preflight=preflight_input,
    output:
        run_file("metrics.json"),
    params:
        cmd=lambda w: G.train_command(run_of(w)),
        attempts=lambda w: attempts_log("train", w),
        # a changed recipe value reruns the runs whose resolved config it changes; a changed model or
        # training code reruns every run (`maskconnect train --replace` retrains a run made by other code)
        config=lambda w: G.config_digest(run_of(w)),
        code=CODE["train"],
    threads: lambda w: run_of(w).threads
    resources:
        gpu=lambda w: run_of(w).gpus,
        runtime=lambda w, attempt: runtime_of(run_of(w), attempt),
        mem_mb=lambda w: run_of(w).mem_mb or 4000,
        slurm_partition=lambda w: slurm_partition(run_of(w).gpus),
    log:
        G.log_file("{grid}", "train", "{run}"),
    benchmark:
        G.benchmark_file("{grid}", "{run}")
    conda:
        ENV
    shell:
        "{params.cmd} 2>&1 | tee -a {params.attempts} > {log}"
