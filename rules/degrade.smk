# Degraded masks at five controlled quality levels for every test subject, on the original grid.


rule degrade:
    input:
        image=image_path,
        label=label_path,
        plan=f"{OUT}/plan.json",
    output:
        masks=expand(f"{OUT}/degraded/{{{{subject}}}}/L{{level}}.nii.gz", level=LEVELS),
        manifest=f"{OUT}/degraded/{{subject}}/manifest.parquet",
    params:
        seed=config["degradation"]["seed"],
        levels=",".join(map(str, LEVELS)),
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/degrade/{{subject}}.log",
    benchmark:
        f"{BENCH}/degrade/{{subject}}.tsv",
    shell:
        "python -m nnqc_pipe degrade --subject {wildcards.subject} --image {input.image:q} --label {input.label:q} "
        "--plan-json {input.plan} --seed {params.seed} --levels {params.levels} --out-masks {output.masks} "
        "--manifest {output.manifest} > {log} 2>&1"


rule degrade_manifest:
    input:
        degraded_all,
    output:
        f"{OUT}/degraded/manifest.parquet",
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/degrade_manifest.log",
    benchmark:
        f"{BENCH}/degrade_manifest.tsv",
    shell:
        "python -m nnqc_pipe degrade-manifest --inputs {input} --out {output} > {log} 2>&1"
