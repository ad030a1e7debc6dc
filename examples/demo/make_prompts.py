"""Write examples/demo/prompts.parquet: 300 docstring-style prompts for the demo model.

Why: the demo model (train_model.py) was trained only on Python standard-library
docstrings, so it continues text like "Return the ..." or "This module provides ..."
well and anything else poorly. These prompts stay in that domain so the generated
text is readable. The output is deterministic (fixed seed, no clock, no environment
input): re-running the script writes the same rows in the same order.

Usage:
    python examples/demo/make_prompts.py [--out examples/demo/prompts.parquet]

Columns: id (str, "demo-0000".."demo-0299"), prompt (str), topic (str), style (str).
"""

import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
SEED = 1234
N_PROMPTS = 300

# (topic, phrase): the short topic word goes into the `topic` column, the phrase into
# the prompt. Phrases have no article; templates add "the"/"a"/"an" themselves.
TOPICS = [
    ("socket", "socket"),
    ("files", "list of files"),
    ("timeout", "timeout"),
    ("path", "file system path"),
    ("encoding", "text encoding"),
    ("thread", "worker thread"),
    ("queue", "queue of pending tasks"),
    ("archive", "zip archive"),
    ("datetime", "date and time"),
    ("header", "HTTP header"),
    ("cookie", "cookie"),
    ("url", "URL"),
    ("json", "JSON document"),
    ("logger", "logger"),
    ("lock", "lock"),
    ("process", "child process"),
    ("buffer", "byte buffer"),
    ("iterator", "iterator"),
    ("dictionary", "dictionary of options"),
    ("string", "string"),
    ("decimal", "decimal number"),
    ("sample", "random sample"),
    ("regex", "regular expression"),
    ("csv", "CSV row"),
    ("email", "email message"),
    ("signal", "signal handler"),
    ("directory", "temporary directory"),
    ("hash", "hash digest"),
    ("database", "database connection"),
    ("certificate", "SSL certificate"),
]

# (style, template). {s} = phrase, {a} = "a"/"an" for the phrase. Lengths range from
# a few words to two sentences, all in the voice of a docstring.
TEMPLATES = [
    ("return", "Return the {s}"),
    ("return", "Return the {s} as"),
    ("return", "Return True if the {s} is"),
    ("return", "Return {a} {s} built from the given arguments. If no arguments are given,"),
    ("module", "This module provides the {s}"),
    ("module", "This module provides {a} {s} interface"),
    ("module", "This module provides support for the {s}. It defines"),
    ("create", "Create a new {s}"),
    ("create", "Create a new {s} and return"),
    ("create", "Create {a} {s} object from"),
    ("create", "Create and return a new {s}. The optional arguments"),
    ("raise", "Raise ValueError if the {s}"),
    ("raise", "Raise TypeError if the {s} is not"),
    ("raise", "Raise an exception if the {s} cannot be used. Otherwise,"),
    ("class", "A class that represents {a} {s}"),
    ("class", "Base class for {s} objects. Subclasses should"),
    ("param", "If the {s} is None,"),
    ("param", "The optional {s} argument"),
    ("param", "The {s} argument, if given, must be"),
    ("note", "Note that the {s}"),
    ("note", "This function is not thread-safe. The {s}"),
    ("note", "Deprecated since version 3.12: the {s}"),
]


def article(phrase: str) -> str:
    # Good enough for these phrases; acronyms like "URL"/"SSL"/"HTTP"/"CSV" are spelled
    # out letter by letter, so choose by pronunciation of the first letter.
    first = phrase.split()[0]
    if first.isupper():
        return "an" if first[0] in "AEFHILMNORSX" else "a"
    return "an" if first[0].lower() in "aeiou" else "a"


def build_rows() -> list[dict]:
    rng = random.Random(SEED)
    per_topic = N_PROMPTS // len(TOPICS)  # 10 templates per topic -> 300 prompts
    rows = []
    for topic, phrase in TOPICS:
        # Different templates per topic, drawn without replacement so no duplicates.
        for style, template in rng.sample(TEMPLATES, per_topic):
            prompt = template.format(s=phrase, a=article(phrase))
            rows.append({"prompt": prompt, "topic": topic, "style": style})
    rng.shuffle(rows)  # interleave topics/styles so any slice of the file is varied
    for i, row in enumerate(rows):
        row["id"] = f"demo-{i:04d}"
    assert len({r["prompt"] for r in rows}) == len(rows) == N_PROMPTS
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "prompts.parquet"))
    args = parser.parse_args()

    rows = build_rows()
    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("topic", pa.string()), ("style", pa.string())]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, args.out)
    styles = sorted({r["style"] for r in rows})
    print(f"wrote {table.num_rows} prompts to {args.out} (styles: {', '.join(styles)})")


if __name__ == "__main__":
    main()
