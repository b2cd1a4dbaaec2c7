# Evaluate each finished run: the final model (frozen masks) and the pruned model, with parameters
# before and after pruning ("Params Train" / "Params Test") and FLOPs per image.


rule evaluate:
    input:
        run_file("metrics.json"),
    output:
        run_file("eval.json"),
    params:
        launcher=lambda w: G.launcher(min(run_of(w).gpus, 1)),
        run=lambda w: run_of(w).run_dir,
        device=lambda w: run_of(w).device,
    resources:
        gpu=lambda w: min(run_of(w).gpus, 1),
    log:
        G.log_file("{grid}", "evaluate", "{run}"),
    conda:
        ENV
    shell:
        "{params.launcher}maskconnect evaluate --run {params.run} --device {params.device} > {log} 2>&1"
