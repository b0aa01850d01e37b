# Scores: candidate vs pGT (predicted quality) and vs GT (real quality), per volume and slice, in mm.


rule score:
    input:
        npz=f"{OUT}/preprocessed/{{subject}}.npz",
        plan=f"{OUT}/plan.json",
        candidate=candidate_path,
        pgt=f"{OUT}/pgt/{{source}}/{{subject}}.nii.gz",
        slices=f"{OUT}/pgt/{{source}}/{{subject}}.slices.parquet",
        gt=lambda w: [] if gt_param(w) == "none" else gt_param(w),
    output:
        f"{OUT}/scores/{{source}}/{{subject}}.parquet",
    params:
        cohort=COHORT,
        gt=lambda w, input: input.gt or "none",
        tolerance=config["metrics"]["surface_dice_tolerance_mm"],
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/score/{{source}}/{{subject}}.log",
    benchmark:
        f"{BENCH}/score/{{source}}/{{subject}}.tsv",
    shell:
        "python -m nnqc_pipe score --cohort {params.cohort} --source {wildcards.source} "
        "--subject {wildcards.subject} --npz {input.npz} --candidate {input.candidate:q} --pgt {input.pgt} "
        "--gt {params.gt:q} --slices {input.slices} --tolerance-mm {params.tolerance} --out {output} > {log} 2>&1"
