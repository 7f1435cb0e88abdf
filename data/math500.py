"""
Download MATH-500 (competition math, 500 test problems) into $PICOCHAT_DIR/data/math500/test.jsonl.

    python data/math500.py

Rows come out as tinyworld's math_*.jsonl: question = the problem, answer = the solution + "\\n#### " + the final
answer (LaTeX kept as it is, e.g. "\\frac{1}{2}"), level = MATH's level (1-5).

The dataset is one JSONL file (test.jsonl: problem, solution, answer, subject, level, unique_id). Its automatic
parquet conversion is tried first, as for every other set; when the datasets-server has none (or only part of
it), the raw file is read instead.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASET, CONFIG, RAW_FILE = "HuggingFaceH4/MATH-500", "default", "test.jsonl"


def normalise(row):
    return {"question": row["problem"], "answer": f"{row['solution']}\n#### {row['answer']}",
            "level": int(row["level"])}


if __name__ == "__main__":
    import common
    import data
    from data.download import convert_hf, download, hf_file_url, write_split
    common.configure(globals())  # no settings: this rejects stray arguments with one clear line
    try:
        convert_hf("math500", DATASET, CONFIG, {"test": "test"}, normalise)
    except RuntimeError as e:  # PermanentError included: no conversion, a partial one, or unreadable rows
        print(f"{DATASET}: no usable parquet conversion ({e}); reading the raw {RAW_FILE}", flush=True)
        raw = download(hf_file_url(DATASET, RAW_FILE), os.path.join(data.data_dir("math500"), "raw", RAW_FILE))
        write_split("math500", "test", map(normalise, data.read_jsonl(raw)), f"{DATASET} {RAW_FILE}")
