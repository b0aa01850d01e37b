# Ingestion: the demo cohort, validation of every subject (one job per chunk of subjects), the deterministic split.


if config["demo"]["enabled"]:

    rule demo_cohort:
        output:
            images=expand(config["images"], subject=SUBJECTS),
            labels=expand(config["labels"], subject=SUBJECTS) if HAS_LABELS else [],
        log:
            f"{LOGS}/demo_cohort.log",
        benchmark:
            f"{BENCH}/demo_cohort.tsv"
        conda:
            "../envs/nnqc.yaml"
        params:
            out_dir=lambda w, output: os.path.dirname(os.path.dirname(output.images[0])),
            n=config["demo"]["n_subjects"],
            seed=config["demo"]["seed"],
        shell:
            "python -m nnqc_pipe demo-cohort --out-dir {params.out_dir} --n-subjects {params.n} --seed {params.seed} > {log} 2>&1"


# Chunk all-NNNN: inspect/{subject}.json for each of its subjects (the chunk record lists them).
rule inspect:
    input:
        images=lambda w: chunk_files("image", "inspect", w.chunk),
        labels=inspect_labels,
    output:
        f"{CHUNKS_DIR}/inspect/{{chunk}}.tsv",
    log:
        f"{LOGS}/inspect/{{chunk}}.log",
    benchmark:
        f"{BENCH}/inspect/{{chunk}}.tsv"
    conda:
        "../envs/nnqc.yaml"
    resources:
        runtime=chunk_runtime("inspect", 0.5),
    params:
        subjects=lambda w: chunk_members("inspect", w.chunk),
        image=pattern("image"),
        label=pattern("label"),
        out=pattern("inspect"),
        values=LABEL_VALUES,
        require_labels=config["require_labels"],
    shell:
        "python -m nnqc_pipe inspect --subjects {params.subjects:q} --image {params.image:q} --label {params.label:q} "
        "--label-values {params.values} --require-labels {params.require_labels} --out {params.out:q} "
        "--record {output} > {log} 2>&1"


checkpoint split:
    input:
        expand(f"{CHUNKS_DIR}/inspect/{{chunk}}.tsv", chunk=INSPECT_CHUNKS),
    output:
        subjects_tsv=f"{OUT}/subjects.tsv",
        split_tsv=SPLIT_TSV,
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{BENCH}/split.tsv"
    conda:
        "../envs/nnqc.yaml"
    params:
        split=config["split"],
        on_bad=config["on_bad_subject"],
        train_model=not QC_MODEL_SOURCE,
    shell:
        "python -m nnqc_pipe split --inspect-chunks {input} --subjects-tsv {output.subjects_tsv} "
        "--split-tsv {output.split_tsv} --test-fraction {params.split[test_fraction]} "
        "--val-fraction {params.split[val_fraction]} --seed {params.split[seed]} "
        "--on-bad-subject {params.on_bad} --train-model {params.train_model} > {log} 2>&1"
