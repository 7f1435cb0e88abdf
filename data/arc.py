"""
Download the AI2 Reasoning Challenge (grade-school science multiple choice), both sets:
$PICOCHAT_DIR/data/arc_easy/{train,test}.jsonl and data/arc_challenge/{train,test}.jsonl.

    python data/arc.py

Rows come out as tinyworld's mc_*.jsonl: {"question", "choices", "answer": index}. A few ARC questions have 3 or
5 choices; they are kept as they are.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASET = "allenai/ai2_arc"
SETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}  # our name -> the dataset's config


def normalise(row):
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        return None
    return {"question": row["question"], "choices": list(row["choices"]["text"]),
            "answer": labels.index(row["answerKey"])}


if __name__ == "__main__":
    import common
    from data.download import convert_hf
    common.configure(globals())  # no settings: this rejects stray arguments with one clear line
    for name, config in SETS.items():
        convert_hf(name, DATASET, config, {"train": "train", "test": "test"}, normalise)
