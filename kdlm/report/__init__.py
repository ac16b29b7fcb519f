"""`kdlm report`: one Markdown + one self-contained HTML report from evaluation and distillation run folders.

    inputs.py    read and validate summary.json (kdlm eval) and run folders (kdlm distill)
    build.py     the sections (tables, charts) and the atomic writer
    plots.py     matplotlib (Agg) charts as PNG bytes
    document.py  the document model and its Markdown / HTML renderings
    cli.py       `kdlm report` argument parsing

matplotlib is imported only when a chart is drawn.
"""

from kdlm.report.build import build_document, make_report, write_report

__all__ = ["build_document", "make_report", "write_report"]
