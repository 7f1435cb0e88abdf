"""
Download MATH (Hendrycks et al. 2021: competition math, 12,500 problems in 7 subjects) as the "math" set:
$PICOCHAT_DIR/data/math/train.jsonl = every MATH problem that is not in MATH-500 (12,000 of them), and test.jsonl =
MATH-500 itself. That is the split reasoning-from-scratch trains GRPO on (Qwen3-0.6B-Base) and measures on.

    python data/math500.py && python data/hendrycks_math.py
    python rl.py --dataset=math ...                  # README.md: the reasoning-from-scratch reproduction

Rows come out as tinyworld's math_*.jsonl: question = the problem, answer = the solution + "\\n#### " + its last
\\boxed{} (problems without one are dropped), level = MATH's level (1-5; 0 where the dataset says "Level ?").
(Not data/math.py: run as a script, that name would shadow Python's own math module.)
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.grade import extract_answer  # noqa: E402  (after the path: run as a script, data/ is not on it)

DATASET = "EleutherAI/hendrycks_math"
SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
            "precalculus")  # the dataset's configs, each with a train and a test split


def normalise(row):
    answer = extract_answer(row["solution"], allow_fallback=False)
    if answer is None:
        return None
    level = re.search(r"\d+", str(row["level"]))
    return {"question": row["problem"], "answer": f"{row['solution']}\n#### {answer}",
            "level": int(level.group()) if level else 0}


def same_problem(text):
    """A problem's text as MATH-500 and MATH are compared: whitespace does not count."""
    return " ".join(text.split())


if __name__ == "__main__":
    import common
    import data
    from data.download import download_hf_split, iter_parquet, write_split
    common.configure(globals())  # no settings: this rejects stray arguments with one clear line
    try:
        math500 = data.load_math("math500", "test")
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None  # which problems to leave out of train must be known first
    held_out = {same_problem(p["question"]) for p in math500}
    raw, rows = os.path.join(data.data_dir("math"), "raw"), []
    for subject in SUBJECTS:
        for split in ("train", "test"):
            paths = download_hf_split(DATASET, subject, split, raw)
            rows += [normalise(r) for path in paths for r in iter_parquet(path)]
    rows = [r for r in rows if r is not None]
    train = [r for r in rows if same_problem(r["question"]) not in held_out]
    print(f"{DATASET}: {len(rows)} problems with a boxed answer, {len(rows) - len(train)} of them in MATH-500",
          flush=True)
    write_split("math", "train", train, f"{DATASET} without MATH-500")
    write_split("math", "test", math500, "MATH-500")
