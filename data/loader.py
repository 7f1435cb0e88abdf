"""
Loaders the stages share: the pretraining token stream (pretrain.py trains on it, evaluate.py measures on it),
bits per byte (the loss measure that does not depend on the tokenizer), and the math problems of post-training
(rl.py and dpo.py): their prompts, the order a run takes them in, and prompt + answer rows to train on.

    rows = TokenRows(tokenizer, data.pretrain_files("val"), batch_size=8, seq_len=512, slots=[0], num_slots=1,
                     loop=False)
    bpb = evaluate_bpb(model, iter(lambda: rows.next_batch(0, device), None), token_bytes, autocast_ctx)
"""

import math
import random
from typing import NamedTuple

import torch

import common
import data
from common import print0
from data import iter_texts

# -----------------------------------------------------------------------------
# The token stream: documents tokenised on the fly, each starting with <|bos|>, packed into rows that each
# begin at a document start (no row opens mid-document). Rows are filled best-fit from a small buffer of
# documents; when nothing fits the remaining space, the oldest document is cropped to fill it.
#
# Sharding is by micro-batch *slot*, not by rank: a step has num_slots = total_batch_size / (B * T) micro-batches,
# and the i-th document of the stream (counted over files and passes) feeds slot i % num_slots. Rank r owns slots
# r*A .. r*A+A-1 (A = accumulation steps). So the batches of a step do not depend on how its micro-batches are
# spread over processes: 2 ranks x 2 accumulation steps train on exactly what 1 process x 4 accumulation steps
# does, and ranks still read disjoint documents. Counting over passes, not within a file, is what lets data with
# fewer documents than slots (one small .txt, a large --total_batch_size) fill every slot: its documents come
# round again, each time to the next slot, where a count restarting at each pass left a slot waiting forever.


class TokenRows:
    """An endless (or, loop=False, finite), resumable source of (B, T) batches for the slots this rank owns."""

    def __init__(self, tokenizer, files, batch_size, seq_len, slots, num_slots, buffer_docs=32, loop=True):
        self.tokenizer, self.files = tokenizer, files
        self.batch_size, self.row_len = batch_size, seq_len + 1
        self.num_slots, self.buffer_docs, self.loop = num_slots, buffer_docs, loop
        self.position = {"epoch": 0, "file": 0, "doc": 0, "index": 0}  # the next document to read, and its number
        self.buffers = {slot: [] for slot in slots}  # per slot: its tokenised documents, in order
        self.read_from = {}  # per slot, after a resume: the index of its first document still to read
        self.reader = None  # the document iterator, started at self.position on first use

    def state(self):
        return {"position": dict(self.position), "buffers": {str(s): b for s, b in self.buffers.items()}}

    def load_state(self, states):
        """Resume from the states of every rank of a saved run (a list, in rank order), which may have had another
        number of ranks: each of our slots takes its queue from the rank that had it, and reading restarts at the
        earliest of those ranks' positions, each slot skipping the documents its old rank had already read."""
        saved = {int(s): state for state in states for s in state["buffers"]}
        if set(saved) != set(range(self.num_slots)):
            raise ValueError(f"the saved data position has {len(saved)} micro-batch slots, this run {self.num_slots}: "
                             f"resume with the same total_batch_size, device_batch_size and max_seq_len")
        self.buffers = {s: [list(d) for d in saved[s]["buffers"][str(s)]] for s in self.buffers}
        self.read_from = {s: saved[s]["position"]["index"] for s in self.buffers}
        self.position = dict(min((saved[s]["position"] for s in self.buffers), key=lambda p: p["index"]))
        self.reader = None

    def documents(self):
        """(index, text) of every document from the saved position on, one pass over the files after another;
        index counts the documents of the stream. The position always names the next document, so a saved state
        resumes exactly. Data without any text, or a file that cannot be read, ends the run with one line."""
        p = self.position
        while True:
            whole_pass, any_text = p["file"] == 0 and p["doc"] == 0, False
            try:
                while p["file"] < len(self.files):
                    for i, text in enumerate(iter_texts(self.files[p["file"]])):
                        if i >= p["doc"]:
                            p.update(doc=i + 1, index=p["index"] + 1)
                            any_text = any_text or bool(text.strip())
                            yield p["index"] - 1, text
                    p.update(file=p["file"] + 1, doc=0)
            except (OSError, ValueError) as e:  # a missing, binary or malformed file (iter_texts names the line)
                raise SystemExit(f"error: {e}") from None
            if whole_pass and not any_text:  # otherwise an endless stream would loop over nothing forever
                where = self.files[0] if len(self.files) == 1 else f"the {len(self.files)} files {self.files[0]} ..."
                raise SystemExit(f"error: {where} holds no text: training needs at least one non-empty document")
            if not self.loop:
                return
            p.update(epoch=p["epoch"] + 1, file=0, doc=0)

    def refill(self, slot):
        """Read documents until `slot` has two windows queued. Documents of our other slots read on the way are
        queued for them: packing only ever looks at a slot's own first `buffer_docs` documents, so what a slot
        packs never depends on when the others refilled (that keeps 1 rank == N ranks)."""
        if self.reader is None:
            self.reader = self.documents()
        texts, owners = [], []
        missing = 2 * self.buffer_docs - len(self.buffers[slot])
        for i, text in self.reader:
            owner = i % self.num_slots
            if owner in self.buffers and i >= self.read_from.get(owner, 0):
                texts.append(text)
                owners.append(owner)
                missing -= owner == slot
                if missing <= 0:
                    break
        if texts:
            for owner, ids in zip(owners, self.tokenizer.encode(texts, prepend=self.tokenizer.bos_id)):
                self.buffers[owner].append(ids)

    def next_row(self, slot):
        row, queue = [], self.buffers[slot]
        while len(row) < self.row_len:
            if len(queue) < self.buffer_docs:
                self.refill(slot)
            if not queue:
                return None  # a finite stream ran out
            space = self.row_len - len(row)
            window = queue[:self.buffer_docs]
            fits = [i for i, d in enumerate(window) if len(d) <= space]
            if fits:
                row.extend(queue.pop(max(fits, key=lambda i: len(window[i]))))  # the first longest that fits
            else:
                row.extend(queue.pop(0)[:space])
        return row

    def next_batch(self, slot, device):
        rows = [self.next_row(slot) for _ in range(self.batch_size)]
        if any(r is None for r in rows):
            return None
        batch = common.to_device(torch.tensor(rows, dtype=torch.long), device)  # (B, T+1)
        return batch[:, :-1], batch[:, 1:]  # inputs, targets: (B, T)


# -----------------------------------------------------------------------------
# Bits per byte


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes, autocast_ctx):
    """Bits per byte: the summed loss over target tokens divided by the bytes they stand for. Unlike the loss,
    it does not depend on the tokenizer's vocabulary. Special tokens (0 bytes) are left out. The sums stay on the
    device until the one read at the end."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for x, y in batches:
        with autocast_ctx:
            loss = model(x, y, loss_reduction="none")  # (B, T) nats per token
        nbytes = token_bytes[y]  # (B, T)
        total_nats += (loss.float() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    total = common.all_sum({"nats": total_nats, "bytes": total_bytes}, token_bytes.device)
    return total["nats"] / (math.log(2) * max(total["bytes"], 1))


# -----------------------------------------------------------------------------
# Math problems for post-training (rl.py, dpo.py): prompts to sample answers to, the order a run takes them in,
# and a prompt plus an answer as one training row.


def math_items(tokenizer, dataset, max_prompt_len, eval_problems, seed, prompt="chat"):
    """(train items, held-out items) of a math dataset, each item (prompt ids, reference answer): the question as
    data.math_prompt puts it (prompt: chat, a user turn; boxed, plain text asking for \\boxed{}), kept only when
    its prompt is at most max_prompt_len tokens; eval_problems test problems drawn at random (the same ones at
    every evaluation)."""
    try:
        train_set, test_set = data.load_math(dataset, "train"), data.load_math(dataset, "test")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    test_set = random.Random(common.derive_seed(seed, "heldout")).sample(test_set, min(eval_problems, len(test_set)))
    items = [[(data.math_prompt(tokenizer, p["question"], prompt), p["answer"]) for p in problems]
             for problems in (train_set, test_set)]
    train_items, test_items = [[(ids, answer) for ids, answer in part if len(ids) <= max_prompt_len] for part in items]
    print0(f"data: {dataset}, {len(train_items)} train problems, {len(test_items)} held-out problems per evaluation")
    if not train_items:
        raise SystemExit(f"error: no {dataset} train problem fits in {max_prompt_len} prompt tokens")
    return train_items, test_items


def step_indices(step, count, num_items, seed):
    """Indices of a step's items: consecutive slices of a shuffled order, reshuffled at every pass over the data.
    The same on every rank and after a resume (it depends only on the step)."""
    out, orders = [], {}
    for i in range(step * count, (step + 1) * count):
        epoch, j = divmod(i, num_items)
        if epoch not in orders:
            orders[epoch] = list(range(num_items))
            random.Random(common.derive_seed(seed, "order", epoch)).shuffle(orders[epoch])
        out.append(orders[epoch][j])
    return out


class Row(NamedTuple):
    inputs: list
    targets: list  # the next tokens
    trained: list  # 1 where the target is a token the policy chose


def make_row(prompt, tokens, mask):
    """One answer to a prompt as a training row: inputs predict targets = the next tokens; trained is 1 where the
    target is a token the policy chose, 0 on the prompt and on forced calculator outputs (the engine's mask)."""
    full = prompt + tokens
    return Row(full[:-1], full[1:], [0] * (len(prompt) - 1) + list(mask))


def collate(rows, device):
    """Right-padded (B, T) tensors of inputs, targets (-1 where not trained: the model skips them) and the mask."""
    T = max(len(x) for x, _, _ in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T); padding is never a target, its value is moot
    y = torch.full((len(rows), T), -1, dtype=torch.long)  # (B, T)
    m = torch.zeros(len(rows), T)  # (B, T)
    for i, (xi, yi, mi) in enumerate(rows):
        mi = torch.tensor(mi, dtype=torch.float32)
        x[i, :len(xi)] = torch.tensor(xi)
        y[i, :len(yi)] = torch.where(mi > 0, torch.tensor(yi), -1)
        m[i, :len(mi)] = mi
    return common.to_device(x, device), common.to_device(y, device), common.to_device(m, device)


def token_logprobs(model, x, y):
    """log p(target) per position, (B, T) float32; 0 where the target is -1."""
    return -model(x, y, loss_reduction="none").float()
