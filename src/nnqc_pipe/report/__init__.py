"""The report: Parquet tables with provenance metadata, and figures for the HTML report."""
