"""
Download MATH-500 (competition math, 500 test problems) into $PICOCHAT_DIR/data/math500/test.jsonl.

    python data/math500.py

Rows come out as tinyworld's math_*.jsonl: question = the problem, answer = the solution + "\\n#### " + the final
answer (LaTeX kept as it is, e.g. "\\frac{1}{2}"), level = MATH's level (1-5).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASET, CONFIG = "HuggingFaceH4/MATH-500", "default"


def normalise(row):
    return {"question": row["problem"], "answer": f"{row['solution']}\n#### {row['answer']}",
            "level": int(row["level"])}


if __name__ == "__main__":
    import common
    from data.download import convert_hf
    common.configure(globals())  # no settings: this rejects stray arguments with one clear line
    convert_hf("math500", DATASET, CONFIG, {"test": "test"}, normalise)
