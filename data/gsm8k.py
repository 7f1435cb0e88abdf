"""
Download GSM8K (grade-school math word problems) into $PICOCHAT_DIR/data/gsm8k/{train,test}.jsonl.

    python data/gsm8k.py

Rows come out as tinyworld's math_*.jsonl: {"question", "answer": "...reasoning...\\n#### 42", "level"}. GSM8K's
answers keep their calculator marks (<<48/2=24>>); data.load_conversations turns them into calculator calls.
GSM8K has no difficulty levels, so "level" is the number of reasoning lines.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASET, CONFIG = "openai/gsm8k", "main"


def normalise(row):
    reasoning, sep, final = row["answer"].rpartition("\n#### ")
    if not sep:
        return None
    answer = final.strip().replace(",", "")  # GSM8K writes some answers as 1,000
    return {"question": row["question"], "answer": f"{reasoning}\n#### {answer}",
            "level": len(reasoning.strip().splitlines())}


if __name__ == "__main__":
    import common
    from data.download import convert_hf
    common.configure(globals())  # no settings: this rejects stray arguments with one clear line
    convert_hf("gsm8k", DATASET, CONFIG, {"train": "train", "test": "test"}, normalise)
