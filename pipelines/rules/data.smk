# Datasets: download (CIFAR) or verify (ImageNet, which must be in data/imagenet); digits and
# synthetic need nothing. Training jobs wait for the marker.


rule prepare_data:
    output:
        G.data_marker("{dataset}"),
    params:
        cmd=lambda w: G.prepare_command(w.dataset),
    log:
        G.log_file("data", "prepare_data", "{dataset}"),
    conda:
        ENV
    shell:
        "{params.cmd} > {log} 2>&1"
