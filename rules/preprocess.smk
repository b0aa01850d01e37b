# Invertible preprocessing of every usable subject into in-plane patch stacks.


rule preprocess:
    input:
        image=image_path,
        label=label_path,
        plan=f"{OUT}/plan.json",
    output:
        f"{OUT}/preprocessed/{{subject}}.npz",
    params:
        label=lambda w, input: input.label if HAS_LABELS else "none",
    log:
        f"{LOGS}/preprocess/{{subject}}.log",
    shell:
        "{NNQC} preprocess --subject {wildcards.subject} --image {input.image:q} --label {params.label:q} "
        "--plan-json {input.plan} --out {output} > {log} 2>&1"
