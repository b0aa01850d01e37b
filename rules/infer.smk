# Inference: a pseudo ground truth for every candidate (source x subject), on the subject's original grid.


rule infer:
    input:
        npz=f"{OUT}/preprocessed/{{subject}}.npz",
        embeddings=lambda w: embeddings_of([w.subject]),
        candidate=candidate_path,
        vae=f"{MODELS}/vae.pt",
        ldm=f"{MODELS}/ldm.pt",
    output:
        pgt=f"{OUT}/pgt/{{source}}/{{subject}}.nii.gz",
        slices=f"{OUT}/pgt/{{source}}/{{subject}}.slices.parquet",
        errors=f"{OUT}/errors/{{source}}/{{subject}}.nii.gz" if config["inference"]["save_error_maps"] else [],
    params:
        embeddings=lambda w, input: input.embeddings or "none",
        errors=lambda w, output: output.errors or "none",
        model_dir=lambda w, input: os.path.dirname(input.ldm),
        inference=as_json(config["inference"]),
        device=config["device"],
        seed=config["seed"],
    resources:
        gpu_job=1,
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/infer/{{source}}/{{subject}}.log",
    benchmark:
        f"{BENCH}/infer/{{source}}/{{subject}}.tsv",
    shell:
        "OMP_NUM_THREADS=1 python -m nnqc_pipe infer --source {wildcards.source} --subject {wildcards.subject} "
        "--npz {input.npz} --embeddings {params.embeddings:q} --candidate {input.candidate:q} "
        "--model-dir {params.model_dir} --inference {params.inference:q} --device {params.device} "
        "--seed {params.seed} --out-pgt {output.pgt} --out-slices {output.slices} --out-errors {params.errors:q} "
        "> {log} 2>&1"
