"""nnqc-pipe: segmentation quality control with nnQC, packaged for Snakemake."""

__version__ = "0.1.0"
