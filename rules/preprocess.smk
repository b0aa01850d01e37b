# Invertible preprocessing of every usable subject into in-plane patch stacks, one job per chunk of subjects.


# Chunk <role>-NNNN: preprocessed/{subject}.npz for each of its subjects (the chunk record lists them).
rule preprocess:
    input:
        images=lambda w: chunk_files("image", "preprocess", w.chunk),
        labels=lambda w: role_label_files("preprocess", w.chunk),
        plan=f"{OUT}/plan.json",
    output:
        f"{CHUNKS_DIR}/preprocess/{{chunk}}.tsv",
    log:
        f"{LOGS}/preprocess/{{chunk}}.log",
    benchmark:
        f"{BENCH}/preprocess/{{chunk}}.tsv"
    conda:
        "../envs/nnqc.yaml"
    resources:
        runtime=chunk_runtime("preprocess", 1),
    params:
        subjects=lambda w: chunk_members("preprocess", w.chunk),
        image=pattern("image"),
        label=role_label_pattern("preprocess"),
        out=pattern("npz"),
    shell:
        "python -m nnqc_pipe preprocess --subjects {params.subjects:q} --image {params.image:q} "
        "--label {params.label:q} --plan-json {input.plan} --out {params.out:q} --record {output} > {log} 2>&1"
