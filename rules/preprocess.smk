# Invertible preprocessing of every usable subject into in-plane patch stacks.


rule preprocess:
    input:
        image=image_path,
        label=label_path,
        plan=f"{OUT}/plan.json",
    output:
        f"{OUT}/preprocessed/{{subject}}.npz",
    params:
        label=label_param,
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/preprocess/{{subject}}.log",
    benchmark:
        f"{BENCH}/preprocess/{{subject}}.tsv",
    shell:
        "python -m nnqc_pipe preprocess --subject {wildcards.subject} --image {input.image:q} --label {params.label:q} "
        "--plan-json {input.plan} --out {output} > {log} 2>&1"
