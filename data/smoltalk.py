"""
Download SmolTalk (general chat, the small version nanochat uses) into $PICOCHAT_DIR/data/smoltalk/{train,val}.jsonl.

    python data/smoltalk.py

Rows come out as tinyworld's chat_*.jsonl: {"messages": [{"role", "content"}, ...]}, an optional system message
then user/assistant turns alternating, ending with the assistant. Other conversations are dropped.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASET, CONFIG = "HuggingFaceTB/smol-smoltalk", "default"


def normalise(row):
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in turns]
    if not turns or len(turns) % 2 or roles != ["user", "assistant"] * (len(turns) // 2):
        return None
    if not all(isinstance(m["content"], str) and m["content"].strip() for m in messages):
        return None
    return {"messages": messages}


if __name__ == "__main__":
    import common
    from data.download import convert_hf
    common.configure(globals())  # no settings: this rejects stray arguments with one clear line
    convert_hf("smoltalk", DATASET, CONFIG, {"train": "train", "val": "test"}, normalise)
