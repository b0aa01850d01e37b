# Ingestion: the demo cohort, per-subject validation, and the deterministic split.


if config["demo"]["enabled"]:

    rule demo_cohort:
        output:
            images=expand(config["images"], subject=SUBJECTS),
            labels=expand(config["labels"], subject=SUBJECTS) if HAS_LABELS else [],
        params:
            out_dir=lambda w, output: os.path.dirname(os.path.dirname(output.images[0])),
            n=config["demo"]["n_subjects"],
            seed=config["demo"]["seed"],
        conda:
            "../envs/nnqc.yaml"
        log:
            f"{LOGS}/demo_cohort.log",
        benchmark:
            f"{BENCH}/demo_cohort.tsv",
        shell:
            "python -m nnqc_pipe demo-cohort --out-dir {params.out_dir} --n-subjects {params.n} --seed {params.seed} > {log} 2>&1"


rule inspect:
    input:
        image=image_path,
        label=lambda w: label_path(w) if config["demo"]["enabled"] else existing_label_path(w),
    output:
        f"{OUT}/inspect/{{subject}}.json",
    params:
        label=label_param,
        values=LABEL_VALUES,
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/inspect/{{subject}}.log",
    benchmark:
        f"{BENCH}/inspect/{{subject}}.tsv",
    shell:
        "python -m nnqc_pipe inspect --subject {wildcards.subject} --image {input.image:q} --label {params.label:q} "
        "--label-values {params.values} --out {output} > {log} 2>&1"


checkpoint split:
    input:
        expand(f"{OUT}/inspect/{{subject}}.json", subject=SUBJECTS),
    output:
        subjects_tsv=f"{OUT}/subjects.tsv",
        split_tsv=f"{OUT}/split.tsv",
    params:
        split=config["split"],
        on_bad=config["on_bad_subject"],
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{BENCH}/split.tsv",
    shell:
        "python -m nnqc_pipe split --inspect-records {input} --subjects-tsv {output.subjects_tsv} "
        "--split-tsv {output.split_tsv} --test-fraction {params.split[test_fraction]} "
        "--val-fraction {params.split[val_fraction]} --seed {params.split[seed]} "
        "--on-bad-subject {params.on_bad} > {log} 2>&1"
