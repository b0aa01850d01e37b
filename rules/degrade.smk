# Degraded masks at five controlled quality levels for every test subject, on the original grid; one job per chunk.


# Chunk test-NNNN: degraded/{subject}/L{level}.nii.gz and degraded/{subject}/manifest.parquet for its subjects.
rule degrade:
    input:
        images=lambda w: chunk_files("image", "degrade", w.chunk),
        labels=lambda w: chunk_files("label", "degrade", w.chunk),
        plan=f"{OUT}/plan.json",
    output:
        f"{CHUNKS_DIR}/degrade/{{chunk}}.tsv",
    log:
        f"{LOGS}/degrade/{{chunk}}.log",
    benchmark:
        f"{BENCH}/degrade/{{chunk}}.tsv"
    conda:
        "../envs/nnqc.yaml"
    resources:
        runtime=chunk_runtime("degrade", 3),
    params:
        subjects=lambda w: chunk_members("degrade", w.chunk),
        image=pattern("image"),
        label=pattern("label"),
        masks=pattern("degraded"),
        manifest=pattern("degraded_manifest"),
        seed=config["degradation"]["seed"],
        levels=" ".join(map(str, LEVELS)),
    shell:
        "python -m nnqc_pipe degrade --subjects {params.subjects:q} --image {params.image:q} --label {params.label:q} "
        "--plan-json {input.plan} --seed {params.seed} --levels {params.levels} --out-masks {params.masks:q} "
        "--manifest {params.manifest:q} --record {output} > {log} 2>&1"


rule degrade_manifest:
    input:
        lambda w: chunk_records("degrade"),
    output:
        f"{OUT}/degraded/manifest.parquet",
    log:
        f"{LOGS}/degrade_manifest.log",
    benchmark:
        f"{BENCH}/degrade_manifest.tsv"
    conda:
        "../envs/nnqc.yaml"
    shell:
        "python -m nnqc_pipe degrade-manifest --chunks {input} --out {output} > {log} 2>&1"
