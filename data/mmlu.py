"""
Download MMLU (57 subjects of multiple choice) into $PICOCHAT_DIR/data/mmlu/{train,test}.jsonl.

    python data/mmlu.py

Rows come out as tinyworld's mc_*.jsonl: {"question", "choices", "answer": index}. train is MMLU's
auxiliary_train split, test its test split.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASET, CONFIG = "cais/mmlu", "all"


def normalise(row):
    row = row.get("train") or row  # some versions nest auxiliary_train rows under "train"
    return {"question": row["question"], "choices": list(row["choices"]), "answer": int(row["answer"])}


if __name__ == "__main__":
    import common
    from data.download import convert_hf
    common.configure(globals())  # no settings: this rejects stray arguments with one clear line
    convert_hf("mmlu", DATASET, CONFIG, {"train": "auxiliary_train", "test": "test"}, normalise)
