# The learned QC opinion (QCResUNet family): k-fold segmenters whose held-out predictions, SegGen transforms and
# degradations of the training subjects' ground truth are the QC network's training candidates.


if LEARNED and not QC_MODEL_SOURCE:

    # Fold k's segmenter trains on the other folds' subjects and predicts fold k at each checkpoint epoch.
    rule train_segmenter:
        input:
            split_tsv=SPLIT_TSV,
            plan=f"{OUT}/plan.json",
            preprocessed=lambda w: chunk_records("preprocess", training_subjects()),
        output:
            f"{MODELS}/segmenters/segmenter_fold{{fold}}.pt",
        log:
            f"{LOGS}/train_segmenter/fold{{fold}}.log",
        benchmark:
            f"{BENCH}/train_segmenter/fold{{fold}}.tsv"
        conda:
            "../envs/nnqc.yaml"
        threads: workflow.cores
        resources:
            gpu_job=1,
        params:
            folds=len(FOLDS),
            npz=pattern("npz"),
            out_dir=lambda w, output: os.path.dirname(output[0]),
            settings=as_json(SETTINGS),
            preset_digest=PRESET_DIGEST,
            device=rule_device,
            seed=config["seed"],
        shell:
            "OMP_NUM_THREADS={threads} python -m nnqc_pipe train-segmenter --fold {wildcards.fold} "
            "--folds {params.folds} --split-tsv {input.split_tsv} --npz {params.npz:q} --plan-json {input.plan} "
            "--settings {params.settings:q} --out-dir {params.out_dir} --device {params.device} "
            "--seed {params.seed} > {log} 2>&1"

    # Fold k's subjects: learned/candidates/{subject}.npz (candidates, real DSC and NSD on the original grid).
    rule learned_candidates:
        input:
            segmenter=f"{MODELS}/segmenters/segmenter_fold{{fold}}.pt",
            split_tsv=SPLIT_TSV,
            plan=f"{OUT}/plan.json",
            preprocessed=lambda w: chunk_records("preprocess", fold_members(w.fold)),
            labels=lambda w: [
                fill(PATTERNS["label"], subject=s) for s in fold_members(w.fold)
            ],
            sources=lambda w: fold_sources(w.fold),
        output:
            f"{CHUNKS_DIR}/learned_candidates/fold{{fold}}.tsv",
        log:
            f"{LOGS}/learned_candidates/fold{{fold}}.log",
        benchmark:
            f"{BENCH}/learned_candidates/fold{{fold}}.tsv"
        conda:
            "../envs/nnqc.yaml"
        params:
            folds=len(FOLDS),
            npz=pattern("npz"),
            labels=pattern("label"),
            sources=lambda w: as_json(LEARNED_SOURCES),
            seggen=config["learned"]["seggen_per_subject"],
            degraded=config["learned"]["degraded_per_subject"],
            tolerance=config["metrics"]["surface_dice_tolerance_mm"],
            out=pattern("learned_candidates"),
            seed=config["degradation"]["seed"],
            fold_seed=config["seed"],
        shell:
            "python -m nnqc_pipe learned-candidates --fold {wildcards.fold} --folds {params.folds} "
            "--split-tsv {input.split_tsv} --npz {params.npz:q} --labels {params.labels:q} "
            "--plan-json {input.plan} --segmenter {input.segmenter} --sources {params.sources:q} "
            "--n-seggen {params.seggen} --n-degraded {params.degraded} --tolerance-mm {params.tolerance} "
            "--out {params.out:q} --record {output} --seed {params.seed} --fold-seed {params.fold_seed} "
            "> {log} 2>&1"

    # The QC network: trained on the train subjects' candidates, selected on the val subjects'.
    rule train_qcnet:
        input:
            candidates=expand(
                f"{CHUNKS_DIR}/learned_candidates/fold{{fold}}.tsv", fold=FOLDS
            ),
            split_tsv=SPLIT_TSV,
            plan=f"{OUT}/plan.json",
        output:
            qcnet=f"{MODELS}/qcnet.pt",
            curves=f"{MODELS}/qcnet_curves.csv",
        log:
            f"{LOGS}/train_qcnet.log",
        benchmark:
            f"{BENCH}/train_qcnet.tsv"
        conda:
            "../envs/nnqc.yaml"
        threads: workflow.cores
        resources:
            gpu_job=1,
        params:
            npz=pattern("npz"),
            learned_candidates=pattern("learned_candidates"),
            out_dir=lambda w, output: os.path.dirname(output.qcnet),
            settings=as_json(SETTINGS),
            preset_digest=PRESET_DIGEST,
            device=rule_device,
            seed=config["seed"],
        shell:
            "OMP_NUM_THREADS={threads} python -m nnqc_pipe train-qcnet --split-tsv {input.split_tsv} "
            "--candidates {params.learned_candidates:q} --npz {params.npz:q} --plan-json {input.plan} "
            "--settings {params.settings:q} --out-dir {params.out_dir} --device {params.device} "
            "--seed {params.seed} > {log} 2>&1"
