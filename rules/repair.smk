# The repair stage (repair.enabled, off by default): a cohort segmenter trained on the labelled training subjects
# segments every test and unlabelled subject and is refined on those QC flags (QC-driven refinement); its masks
# before and after refinement are QC'd by infer and score as two more sources (REPAIR_SOURCES).


if REPAIR:

    # The cohort segmenter: trained on the train subjects, its checkpoint selected on the val subjects.
    rule train_repair_segmenter:
        input:
            split_tsv=SPLIT_TSV,
            plan=f"{OUT}/plan.json",
            preprocessed=lambda w: chunk_records("preprocess", training_subjects()),
        output:
            f"{MODELS}/repair/segmenter.pt",
        log:
            f"{LOGS}/train_repair_segmenter.log",
        benchmark:
            f"{BENCH}/train_repair_segmenter.tsv"
        conda:
            "../envs/nnqc.yaml"
        threads: workflow.cores
        resources:
            gpu_job=1,
        params:
            npz=pattern("npz"),
            out_dir=lambda w, output: os.path.dirname(output[0]),
            settings=as_json(SETTINGS),
            preset_digest=PRESET_DIGEST,
            device=rule_device,
            seed=config["seed"],
        shell:
            "OMP_NUM_THREADS={threads} python -m nnqc_pipe train-repair-segmenter --split-tsv {input.split_tsv} "
            "--npz {params.npz:q} --plan-json {input.plan} --settings {params.settings:q} "
            "--out-dir {params.out_dir} --device {params.device} --seed {params.seed} > {log} 2>&1"

    # One job loops: segment the cohort, QC every mask (pGT as in infer), flag, refine on the flagged subjects,
    # re-QC them, until nothing is flagged or repair.epochs pass; writes both sources' masks.
    rule repair:
        input:
            segmenter=f"{MODELS}/repair/segmenter.pt",
            split_tsv=SPLIT_TSV,
            plan=f"{OUT}/plan.json",
            preprocessed=lambda w: chunk_records(
                "preprocess",
                training_subjects() + roles()["test"] + roles()["unlabelled"],
            ),
            embeddings=lambda w: (
                chunk_records("embed", roles()["test"] + roles()["unlabelled"])
                if USES_IMAGE
                else []
            ),
            vae=f"{MODELS}/vae.pt",
            ldm=f"{MODELS}/ldm.pt",
            qcnet=f"{MODELS}/qcnet.pt" if REPAIR_USES_LEARNED else [],
        output:
            record=REPAIR_RECORD,
            rounds=f"{OUT}/repair/rounds.parquet",
        log:
            f"{LOGS}/repair.log",
        benchmark:
            f"{BENCH}/repair.tsv"
        conda:
            "../envs/nnqc.yaml"
        threads: workflow.cores
        resources:
            gpu_job=1,
        params:
            npz=pattern("npz"),
            embeddings=pattern("embeddings"),
            masks=pattern("repair"),
            settings=as_json(SETTINGS),
            repair=as_json(config["repair"]),
            report=as_json(config["report"]),
            inference=lambda w: as_json(INFERENCE_SETTINGS),
            model_dir=lambda w, input: os.path.dirname(input.ldm),
            qcnet=lambda w, input: input.qcnet or "none",
            device=rule_device,
            seed=config["seed"],
        shell:
            "OMP_NUM_THREADS={threads} python -m nnqc_pipe repair --split-tsv {input.split_tsv} --npz {params.npz:q} "
            "--embeddings {params.embeddings:q} --plan-json {input.plan} --settings {params.settings:q} "
            "--repair {params.repair:q} --report {params.report:q} --inference {params.inference:q} "
            "--segmenter {input.segmenter} --model-dir {params.model_dir} --out-masks {params.masks:q} "
            "--out-rounds {output.rounds} --record {output.record} --qcnet {params.qcnet:q} "
            "--device {params.device} --seed {params.seed} > {log} 2>&1"
