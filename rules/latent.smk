# Wang et al.'s latent-search QC opinion: a joint image–mask VAE trained on the labelled training subjects; the
# search itself runs per candidate in the infer jobs (rules/infer.smk).


if LATENT and not QC_MODEL_SOURCE:

    # The joint VAE: trained on the train subjects' slices (image + label), selected on the val subjects'.
    rule train_latent_vae:
        input:
            split_tsv=SPLIT_TSV,
            plan=f"{OUT}/plan.json",
            preprocessed=lambda w: chunk_records("preprocess", training_subjects()),
        output:
            vae=f"{MODELS}/latent_vae.pt",
            curves=f"{MODELS}/latent_vae_curves.csv",
        log:
            f"{LOGS}/train_latent_vae.log",
        benchmark:
            f"{BENCH}/train_latent_vae.tsv"
        conda:
            "../envs/nnqc.yaml"
        threads: workflow.cores
        resources:
            gpu_job=1,
        params:
            npz=pattern("npz"),
            out_dir=lambda w, output: os.path.dirname(output.vae),
            settings=as_json(SETTINGS),
            preset_digest=LATENT_DIGEST,
            device=rule_device,
            seed=config["seed"],
        shell:
            "OMP_NUM_THREADS={threads} python -m nnqc_pipe train-latent-vae --split-tsv {input.split_tsv} "
            "--npz {params.npz:q} --plan-json {input.plan} --settings {params.settings:q} "
            "--out-dir {params.out_dir} --device {params.device} --seed {params.seed} > {log} 2>&1"
