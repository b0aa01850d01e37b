# The models: E2 embeddings cached per subject (one job per chunk), the VAE-GAN (stage 1) and the conditioned LDM
# (stage 2), or a QC model trained elsewhere (qc_model).


# Chunk <role>-NNNN: embeddings/{subject}.npz for each of its subjects; the expert is loaded once per chunk.
rule embed:
    input:
        preprocessed=lambda w: chunk_records("preprocess", members("embed", w.chunk)),
        plan=f"{OUT}/plan.json",
    output:
        f"{CHUNKS_DIR}/embed/{{chunk}}.tsv",
    log:
        f"{LOGS}/embed/{{chunk}}.log",
    benchmark:
        f"{BENCH}/embed/{{chunk}}.tsv"
    conda:
        "../envs/nnqc.yaml"
    resources:
        gpu_job=1,
        runtime=chunk_runtime("embed", 0.5),
    params:
        subjects=lambda w: chunk_members("embed", w.chunk),
        npz=pattern("npz"),
        out=pattern("embeddings"),
        settings=as_json(SETTINGS),
        device=rule_device,
        expert_sha256=EXPERT_SHA256 or "none",
    shell:
        "python -m nnqc_pipe embed --subjects {params.subjects:q} --npz {params.npz:q} --plan-json {input.plan} "
        "--settings {params.settings:q} --device {params.device} --expert-sha256 {params.expert_sha256} "
        "--out {params.out:q} --record {output} > {log} 2>&1"


# qc_model: the bundle of a model trained elsewhere replaces fingerprint, plan and training (checked at start in
# common.smk); its model card copy says where it comes from (field qc_model).
if QC_MODEL_SOURCE:

    rule import_model:
        input:
            [f"{QC_MODEL_SOURCE}/{name}" for name in (*BUNDLE_FILES, MANIFEST)],
        output:
            vae=f"{MODELS}/vae.pt",
            ldm=f"{MODELS}/ldm.pt",
            qcnet=[f"{MODELS}/qcnet.pt"] if LEARNED else [],
            latent_vae=[f"{MODELS}/latent_vae.pt"] if LATENT else [],
            card=f"{MODELS}/model_card.json",
            fingerprint=f"{OUT}/fingerprint.json",
            plan=f"{OUT}/plan.json",
        log:
            f"{LOGS}/import_model.log",
        benchmark:
            f"{BENCH}/import_model.tsv"
        conda:
            "../envs/nnqc.yaml"
        params:
            bundle=QC_MODEL_SOURCE,
            models_dir=MODELS,
        shell:
            "python -m nnqc_pipe import-model --bundle {params.bundle:q} --models-dir {params.models_dir:q} "
            "--fingerprint-out {output.fingerprint} --plan-out {output.plan} > {log} 2>&1"

else:

    rule train_vae:
        input:
            split_tsv=SPLIT_TSV,
            plan=f"{OUT}/plan.json",
            preprocessed=lambda w: chunk_records("preprocess", training_subjects()),
        output:
            vae=f"{MODELS}/vae.pt",
            curves=f"{MODELS}/vae_curves.csv",
        log:
            f"{LOGS}/train_vae.log",
        benchmark:
            f"{BENCH}/train_vae.tsv"
        conda:
            "../envs/nnqc.yaml"
        threads: workflow.cores
        resources:
            gpu_job=1,
        params:
            preprocessed_dir=f"{OUT}/preprocessed",
            out_dir=lambda w, output: os.path.dirname(output.vae),
            settings=as_json(SETTINGS),
            preset_digest=PRESET_DIGEST,
            device=rule_device,
            seed=config["seed"],
        shell:
            "OMP_NUM_THREADS={threads} python -m nnqc_pipe train-vae --split-tsv {input.split_tsv} "
            "--preprocessed-dir {params.preprocessed_dir} --plan-json {input.plan} --settings {params.settings:q} "
            "--out-dir {params.out_dir} --device {params.device} --seed {params.seed} > {log} 2>&1"

    rule train_ldm:
        input:
            split_tsv=SPLIT_TSV,
            plan=f"{OUT}/plan.json",
            vae=f"{MODELS}/vae.pt",
            preprocessed=lambda w: chunk_records("preprocess", training_subjects()),
            embeddings=lambda w: (
                chunk_records("embed", training_subjects()) if USES_IMAGE else []
            ),
        output:
            ldm=f"{MODELS}/ldm.pt",
            curves=f"{MODELS}/ldm_curves.csv",
            card=f"{MODELS}/model_card.json",
        log:
            f"{LOGS}/train_ldm.log",
        benchmark:
            f"{BENCH}/train_ldm.tsv"
        conda:
            "../envs/nnqc.yaml"
        threads: workflow.cores
        resources:
            gpu_job=1,
        params:
            preprocessed_dir=f"{OUT}/preprocessed",
            embeddings_dir=f"{OUT}/embeddings",
            out_dir=lambda w, output: os.path.dirname(output.ldm),
            settings=as_json(SETTINGS),
            preset_digest=PRESET_DIGEST,
            device=rule_device,
            seed=config["seed"],
        shell:
            "OMP_NUM_THREADS={threads} python -m nnqc_pipe train-ldm --split-tsv {input.split_tsv} "
            "--preprocessed-dir {params.preprocessed_dir} --embeddings-dir {params.embeddings_dir} "
            "--plan-json {input.plan} --settings {params.settings:q} --vae {input.vae} --out-dir {params.out_dir} "
            "--device {params.device} --seed {params.seed} > {log} 2>&1"
