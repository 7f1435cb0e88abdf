"""
Download HellaSwag (commonsense sentence endings) into $PICOCHAT_DIR/data/hellaswag/{train,test}.jsonl.

    python data/hellaswag.py

Rows come out as tinyworld's mc_*.jsonl: question = the context, choices = the 4 endings, answer = the right
ending's index (Rowan/hellaswag stores the label as a string, "0".."3"). HellaSwag's own test split has no labels
(""), so it is never downloaded: our test is its validation split.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASET, CONFIG = "Rowan/hellaswag", "default"


def normalise(row):
    if str(row.get("label", "")).strip() == "":
        return None
    return {"question": row["ctx"], "choices": list(row["endings"]), "answer": int(row["label"])}


if __name__ == "__main__":
    import common
    from data.download import convert_hf
    common.configure(globals())  # no settings: this rejects stray arguments with one clear line
    convert_hf("hellaswag", DATASET, CONFIG, {"train": "train", "test": "validation"}, normalise)
