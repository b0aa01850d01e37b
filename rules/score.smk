# Scores: candidate vs pGT (predicted quality) and vs GT (real quality), per volume and slice, in mm.


# Chunk test-NNNN / unlabelled-NNNN: scores/{source}/{subject}.parquet for every source of each of its subjects.
rule score:
    input:
        preprocessed=lambda w: chunk_records("preprocess", members("score", w.chunk)),
        plan=f"{OUT}/plan.json",
        # The candidate masks are inputs of the infer chunks below (a changed mask reruns its infer chunk, hence
        # this one): listing them here again only cost DAG time per subject.
        pgt=lambda w: chunk_records("infer", members("score", w.chunk)),
        gt=lambda w: (
            chunk_files("label", "score", w.chunk)
            if HAS_LABELS and chunk_group(w.chunk) == "test"
            else []
        ),
    output:
        f"{CHUNKS_DIR}/score/{{chunk}}.tsv",
    log:
        f"{LOGS}/score/{{chunk}}.log",
    benchmark:
        f"{BENCH}/score/{{chunk}}.tsv"
    conda:
        "../envs/nnqc.yaml"
    resources:
        runtime=chunk_runtime("score", 1),
    params:
        cohort=COHORT,
        tasks=lambda w: as_json(chunk_tasks("score", w.chunk)),
        candidates=lambda w: as_json(CANDIDATES),
        npz=pattern("npz"),
        pgt=pattern("pgt"),
        slices=pattern("slices"),
        gt=lambda w, input: PATTERNS["label"] if input.gt else "none",
        out=pattern("scores"),
        learned=pattern("learned"),
        tolerance=config["metrics"]["surface_dice_tolerance_mm"],
    shell:
        "python -m nnqc_pipe score --cohort {params.cohort} --tasks {params.tasks:q} --npz {params.npz:q} "
        "--plan-json {input.plan} --candidates {params.candidates:q} --pgt {params.pgt:q} --gt {params.gt:q} "
        "--slices {params.slices:q} --learned {params.learned:q} --tolerance-mm {params.tolerance} "
        "--out {params.out:q} --record {output} "
        "> {log} 2>&1"
