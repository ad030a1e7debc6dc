"""A job's report: OUTPUT_URI/_report/ with index.html, report.md and figures.

    data.py       reads the record, commit records and output files (sampling the texts)
    features.py   counts the columns of generation features: logprobs, adapters, structured output, reasoning
    diversity.py  repeats, distinct-n and self-BLEU of the sampled texts
    figures.py    matplotlib figures as PNG
    content.py    what the report says, section by section
    render.py     the same content as report.md and as one self-contained index.html
    build.py      all of it, written to the output

`bulkgen report OUTPUT_URI` builds it at any time; the driver builds it as a
job ends (output.report).
"""

from jobs.report.build import Written, write_report

__all__ = ["Written", "write_report"]
