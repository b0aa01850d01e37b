# Inference: a pseudo ground truth for every candidate (source x subject), on the subject's original grid, the
# learned opinion's error maps (learned/estimated/...) and the latent search's counts when they are on.


# Chunk test-NNNN / unlabelled-NNNN: pgt/{source}/{subject}.nii.gz (+ .slices.parquet, errors/...) for every source
# of each of its subjects; the VAE and the LDM are loaded once per chunk.
rule infer:
    input:
        preprocessed=lambda w: chunk_records("preprocess", members("infer", w.chunk)),
        embeddings=lambda w: (
            chunk_records("embed", members("infer", w.chunk)) if USES_IMAGE else []
        ),
        candidates=lambda w: candidate_inputs("infer", w.chunk),
        vae=f"{MODELS}/vae.pt",
        ldm=f"{MODELS}/ldm.pt",
        qcnet=f"{MODELS}/qcnet.pt" if LEARNED else [],
        latent_vae=f"{MODELS}/latent_vae.pt" if LATENT else [],
    output:
        f"{CHUNKS_DIR}/infer/{{chunk}}.tsv",
    log:
        f"{LOGS}/infer/{{chunk}}.log",
    benchmark:
        f"{BENCH}/infer/{{chunk}}.tsv"
    conda:
        "../envs/nnqc.yaml"
    # A chunk is one process: on a CPU-only machine it uses up to 8 cores (fewer when --cores is smaller).
    threads: 8
    resources:
        gpu_job=1,
        runtime=chunk_runtime("infer", 2),
    params:
        tasks=lambda w: as_json(chunk_tasks("infer", w.chunk)),
        candidates=lambda w: as_json(CANDIDATES),
        npz=pattern("npz"),
        embeddings=pattern("embeddings"),
        pgt=pattern("pgt"),
        slices=pattern("slices"),
        errors=pattern("errors"),
        learned=pattern("learned"),
        qcnet=lambda w, input: input.qcnet or "none",
        model_dir=lambda w, input: os.path.dirname(input.ldm),
        # a function: the latent search's surrogate path pattern holds {source} and {subject}
        inference=lambda w: as_json(INFERENCE_SETTINGS),
        device=rule_device,
        seed=config["seed"],
    shell:
        "OMP_NUM_THREADS={threads} python -m nnqc_pipe infer --tasks {params.tasks:q} --npz {params.npz:q} "
        "--embeddings {params.embeddings:q} --candidates {params.candidates:q} --model-dir {params.model_dir} "
        "--inference {params.inference:q} --device {params.device} --seed {params.seed} --out-pgt {params.pgt:q} "
        "--out-slices {params.slices:q} --out-errors {params.errors:q} --qcnet {params.qcnet:q} "
        "--out-learned {params.learned:q} --record {output} > {log} 2>&1"
