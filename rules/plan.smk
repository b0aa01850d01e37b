# Fingerprint of the training subjects and the plan derived from it (with qc_model: the bundle's, see models.smk).


if not QC_MODEL_SOURCE:

    rule fingerprint:
        input:
            split_tsv=SPLIT_TSV,
            records=expand(f"{CHUNKS_DIR}/inspect/{{chunk}}.tsv", chunk=INSPECT_CHUNKS),
        output:
            f"{OUT}/fingerprint.json",
        log:
            f"{LOGS}/fingerprint.log",
        benchmark:
            f"{BENCH}/fingerprint.tsv"
        conda:
            "../envs/nnqc.yaml"
        params:
            inspect_dir=f"{OUT}/inspect",
            modality=config["modality"],
            label_names=as_json(LABELS),
        shell:
            "python -m nnqc_pipe fingerprint --split-tsv {input.split_tsv} --inspect-dir {params.inspect_dir} "
            "--modality {params.modality} --label-names {params.label_names:q} --out {output} > {log} 2>&1"

    rule plan:
        input:
            f"{OUT}/fingerprint.json",
        output:
            f"{OUT}/plan.json",
        log:
            f"{LOGS}/plan.log",
        benchmark:
            f"{BENCH}/plan.tsv"
        conda:
            "../envs/nnqc.yaml"
        params:
            overrides=as_json(PLAN_OVERRIDES),
        shell:
            "python -m nnqc_pipe plan --fingerprint-json {input} --overrides {params.overrides:q} --out {output} "
            "> {log} 2>&1"
