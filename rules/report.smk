# The QC report: four Parquet tables with provenance metadata, and figures for `snakemake --report`.


rule report:
    input:
        scores=lambda w: chunk_records("score"),
        card=f"{MODELS}/model_card.json",
        vae=f"{MODELS}/vae.pt",
        ldm=f"{MODELS}/ldm.pt",
    output:
        subjects=f"{OUT}/report/subjects.parquet",
        slices=f"{OUT}/report/slices.parquet",
        summary=f"{OUT}/report/summary.parquet",
        ranking=f"{OUT}/report/ranking.parquet",
        scatter_dsc=report(
            f"{OUT}/report/figures/predicted_vs_real_dsc.png",
            caption="report/predicted_vs_real.rst",
            category="Predicted vs real quality",
        ),
        scatter_hd95=report(
            f"{OUT}/report/figures/predicted_vs_real_hd95_mm.png",
            caption="report/predicted_vs_real.rst",
            category="Predicted vs real quality",
        ),
        mae=report(
            f"{OUT}/report/figures/mae_per_level.png",
            caption="report/mae_per_level.rst",
            category="Predicted vs real quality",
        ),
        overlays=report(
            f"{OUT}/report/figures/worst_overlays.png",
            caption="report/worst_overlays.rst",
            category="Worst candidates",
        ),
    params:
        out_dir=lambda w, output: os.path.dirname(output.subjects),
        figures_dir=lambda w, output: os.path.dirname(output.mae),
        cohort=COHORT,
        qc_pass=config["report"]["qc_pass_dsc"],
        digest=CONFIG_DIGEST,
        model_dir=lambda w, input: os.path.dirname(input.ldm),
        results_dir=lambda w, input: os.path.dirname(os.path.dirname(input.card)),
        n_overlays=config["report"]["n_overlays"],
    conda:
        "../envs/nnqc.yaml"
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv",
    shell:
        "python -m nnqc_pipe report --score-chunks {input.scores} --out-dir {params.out_dir} --cohort {params.cohort} "
        "--qc-pass-dsc {params.qc_pass} --config-digest {params.digest} --model-dir {params.model_dir} "
        "--figures-dir {params.figures_dir} --results-dir {params.results_dir} --n-overlays {params.n_overlays} "
        "> {log} 2>&1"
