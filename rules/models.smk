# The models: E2 embeddings cached per subject, the VAE-GAN (stage 1) and the conditioned LDM (stage 2).


rule embed:
    input:
        npz=f"{OUT}/preprocessed/{{subject}}.npz",
        plan=f"{OUT}/plan.json",
    output:
        f"{OUT}/embeddings/{{subject}}.npz",
    params:
        settings=as_json(SETTINGS),
        device=config["device"],
    resources:
        gpu_job=1,
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/embed/{{subject}}.log",
    benchmark:
        f"{BENCH}/embed/{{subject}}.tsv",
    shell:
        "python -m nnqc_pipe embed --npz {input.npz} --plan-json {input.plan} --settings {params.settings:q} "
        "--device {params.device} --out {output} > {log} 2>&1"


rule train_vae:
    input:
        split_tsv=f"{OUT}/split.tsv",
        plan=f"{OUT}/plan.json",
        npz=lambda w: expand(f"{OUT}/preprocessed/{{subject}}.npz", subject=roles()["train"] + roles()["val"]),
    output:
        vae=f"{MODELS}/vae.pt",
        curves=f"{MODELS}/vae_curves.csv",
    params:
        preprocessed_dir=f"{OUT}/preprocessed",
        out_dir=lambda w, output: os.path.dirname(output.vae),
        settings=as_json(SETTINGS),
        device=config["device"],
        seed=config["seed"],
    threads: workflow.cores
    resources:
        gpu_job=1,
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/train_vae.log",
    benchmark:
        f"{BENCH}/train_vae.tsv",
    shell:
        "OMP_NUM_THREADS={threads} python -m nnqc_pipe train-vae --split-tsv {input.split_tsv} "
        "--preprocessed-dir {params.preprocessed_dir} --plan-json {input.plan} --settings {params.settings:q} "
        "--out-dir {params.out_dir} --device {params.device} --seed {params.seed} > {log} 2>&1"


rule train_ldm:
    input:
        split_tsv=f"{OUT}/split.tsv",
        plan=f"{OUT}/plan.json",
        vae=f"{MODELS}/vae.pt",
        npz=lambda w: expand(f"{OUT}/preprocessed/{{subject}}.npz", subject=roles()["train"] + roles()["val"]),
        embeddings=lambda w: embeddings_of(roles()["train"] + roles()["val"]),
    output:
        ldm=f"{MODELS}/ldm.pt",
        curves=f"{MODELS}/ldm_curves.csv",
        card=f"{MODELS}/model_card.json",
    params:
        preprocessed_dir=f"{OUT}/preprocessed",
        embeddings_dir=f"{OUT}/embeddings",
        out_dir=lambda w, output: os.path.dirname(output.ldm),
        settings=as_json(SETTINGS),
        device=config["device"],
        seed=config["seed"],
    threads: workflow.cores
    resources:
        gpu_job=1,
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/train_ldm.log",
    benchmark:
        f"{BENCH}/train_ldm.tsv",
    shell:
        "OMP_NUM_THREADS={threads} python -m nnqc_pipe train-ldm --split-tsv {input.split_tsv} "
        "--preprocessed-dir {params.preprocessed_dir} --embeddings-dir {params.embeddings_dir} "
        "--plan-json {input.plan} --settings {params.settings:q} --vae {input.vae} --out-dir {params.out_dir} "
        "--device {params.device} --seed {params.seed} > {log} 2>&1"
