# The QC report: Parquet tables with provenance metadata, the decisions (verdicts, exclusions, selection, review
# lists), and figures for `snakemake --report`. Thresholds are params: changing them reruns this rule only.


rule report:
    input:
        scores=lambda w: chunk_records("score"),
        card=f"{MODELS}/model_card.json",
        vae=f"{MODELS}/vae.pt",
        ldm=f"{MODELS}/ldm.pt",
        qcnet=f"{MODELS}/qcnet.pt" if LEARNED else [],
        latent_vae=f"{MODELS}/latent_vae.pt" if LATENT else [],
        plan=f"{OUT}/plan.json",
        fingerprint=f"{OUT}/fingerprint.json",
    output:
        subjects=f"{OUT}/report/subjects.parquet",
        slices=f"{OUT}/report/slices.parquet",
        summary=f"{OUT}/report/summary.parquet",
        ranking=f"{OUT}/report/ranking.parquet",
        selection=f"{OUT}/report/selection.parquet",
        review=f"{OUT}/report/review.parquet",
        regions=f"{OUT}/report/error_regions.parquet",
        methods=f"{OUT}/report/methods.parquet",
        exclusions=f"{OUT}/report/exclusions.tsv",
        selected=directory(f"{OUT}/selected"),
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
        distributions=report(
            f"{OUT}/report/figures/predicted_distributions.png",
            caption="report/predicted_distributions.rst",
            category="Predicted quality",
        ),
        verdicts=report(
            f"{OUT}/report/figures/verdicts.png",
            caption="report/verdicts.rst",
            category="Decisions",
        ),
        risk_coverage=report(
            f"{OUT}/report/figures/risk_coverage.png",
            caption="report/risk_coverage.rst",
            category="Decisions",
        ),
        methods_figure=report(
            f"{OUT}/report/figures/methods.png",
            caption="report/methods.rst",
            category="QC methods",
        ),
        methods_table=report(
            f"{OUT}/report/figures/methods.html",
            caption="report/methods.rst",
            category="QC methods",
        ),
        overlays=report(
            f"{OUT}/report/figures/worst_overlays.png",
            caption="report/worst_overlays.rst",
            category="Worst candidates",
        ),
        gallery=report(
            f"{OUT}/report/figures/review_gallery.png",
            caption="report/review_gallery.rst",
            category="Decisions",
        ),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    conda:
        "../envs/nnqc.yaml"
    params:
        out_dir=lambda w, output: os.path.dirname(output.subjects),
        figures_dir=lambda w, output: os.path.dirname(output.mae),
        cohort=COHORT,
        settings=as_json(REPORT_SETTINGS),
        digest=CONFIG_DIGEST,
        model_dir=lambda w, input: os.path.dirname(input.ldm),
        candidates=lambda w: as_json(CANDIDATES),
        pgt=pattern("pgt"),
        inspect=pattern("inspect"),
        selected=pattern("selected"),
        results_dir=lambda w, input: os.path.dirname(input.plan),
        learned=pattern("learned"),
    shell:
        "python -m nnqc_pipe report --score-chunks {input.scores} --out-dir {params.out_dir} --cohort {params.cohort} "
        "--settings {params.settings:q} --config-digest {params.digest} --model-dir {params.model_dir} "
        "--plan-json {input.plan} --fingerprint-json {input.fingerprint} --inspect {params.inspect:q} --candidates {params.candidates:q} --pgt {params.pgt:q} "
        "--selected {params.selected:q} --figures-dir {params.figures_dir} --results-dir {params.results_dir} "
        "--learned {params.learned:q} > {log} 2>&1"
