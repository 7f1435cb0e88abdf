"""
Chat fine-tuning (SFT): teach the base model to converse, on conversations rendered with the chat special tokens.
The loss is taken only on what the assistant writes (its text, its calculator calls and <|assistant_end|>).

    python sft.py                                # the latest base checkpoint, the default data mixture
    python sft.py --data=my_chats.jsonl          # add your own conversations ({"messages": [...]} per line)
    python sft.py --mid=1                        # mid-training: every token trained, higher LR, saves a "mid" stage
    python sft.py --source=mid                   # then SFT on top of it
    python sft.py --source=hf:Qwen/Qwen3-0.6B-Base --device_batch_size=1 --total_batch_size=8192
                                                 # an open model (python data/hf_model.py first): AdamW at 1e-5
    python sft.py --lora_rank=16                 # LoRA: adapters on the frozen base (--quantize=int4: QLoRA)
    python sft.py --distill_from=rl --distill_samples=8   # distillation: add the rl model's verified answers
    python sft.py --source=sft --out_tag=d4x --distill_from=sft --mixture=0 --num_iterations=100   # expert iteration
    torchrun --nproc_per_node=8 sft.py
    torchrun --nproc_per_node=8 sft.py --zero=3      # optimiser states, gradients and weights sharded (as pretrain.py)

The default mixture (data.load_conversations): the built-in chats and word problems, plus SmolTalk, GSM8K and MMLU
when downloaded. Reads $PICOCHAT_DIR/checkpoints/<source>/ (or the open model's folder), writes
$PICOCHAT_DIR/checkpoints/sft/<model tag>/ (or mid/); an open model's tag is its folder's name.

Distillation, or rejection-sampling fine-tuning (STaR, expert iteration): with --distill_from, a teacher checkpoint
(any stage and tag, e.g. a larger model, as long as it has the student's tokenizer) answers the train word problems
distill_samples times each with the Engine, calculator included; the verifier (data/grade.py) keeps the right
answers that ended their turn, distinct, at most distill_keep per problem, and they join the training
conversations. They are also written to $PICOCHAT_DIR/data/distill/<teacher>.jsonl, which --data= reads again
without sampling. With the sft model as its own teacher and --source=sft it is expert iteration: the model learns
from its own best answers.
"""

import math
import os
import random
import time

import torch
import torch.distributed as dist

import common
from common import print0
from data import iter_jsonl, iter_texts, load_conversations, load_math, pretrain_files, write_jsonl
from data.grade import grade, response_text, sample_groups
from model import Engine, merge_lora

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
source = "base"             # the model to start from: base, mid, sft (to train an sft model further), or an open
                            # model: hf:<org>/<name> or a folder
model_tag = ""              # default: the source's latest
out_tag = ""                # the model tag to save under; "": the source's (--source=sft needs another)
data = ""                   # extra conversations (jsonl of {"messages": [...]}), comma-separated paths
mixture = True              # train on the default mixture; off: only on --data and the teacher's answers
# distillation / rejection sampling: a teacher's verified answers to the train word problems join the data
distill_from = ""           # the teacher's stage (sft, rl, ...); "": no distillation
distill_tag = ""            # the teacher's model tag; "": that stage's latest
distill_dataset = "tinyworld"   # whose train problems it answers: tinyworld or gsm8k
distill_problems = 0        # how many of them, drawn at random (0: all)
distill_samples = 8         # k: answers sampled per problem
distill_keep = 2            # m: at most this many distinct right answers kept per problem
distill_max_new_tokens = 96     # the teacher's longest answer (one cut short is never kept)
distill_temperature = 1.0
mid = False                 # mid-training: train on every token (no assistant mask), save as stage "mid"
text_mix = 0.0              # share of the trained tokens that are pretraining text (every token trained): chats
                            # alone make the model forget its text (InstructGPT's ptx mixes pretraining data back in)
max_seq_len = 512
device_batch_size = 8       # rows per forward/backward per process
total_batch_size = 16384    # tokens (rows * max_seq_len) per step, over all processes and accumulation steps
num_epochs = 1.0
num_iterations = -1         # explicit number of steps (overrides num_epochs)
optimizer = ""              # muon: picochat's AdamW + Muon at lr_scale x its rates | adamw: AdamW at lr on every
                            # weight | "": adamw for an open model (or a checkpoint trained from one), else muon
lr_scale = 0.1              # muon: multiplies the model's default learning rates (SFT fine-tunes gently)
lr = 1e-5                   # adamw: the learning rate (pretrained models fine-tune at ~1e-5)
warmdown_ratio = 1.0        # the lr falls linearly to 0 over this last fraction of the run
weight_decay = 0.0
eval_every = 50             # validation loss and a few sampled answers every this many steps (and at the end)
eval_rows = 64              # validation rows per evaluation
save_every = 0              # checkpoint every this many steps (0: only at the end)
resume = False
# LoRA: low-rank adapters on a frozen base instead of training every weight (model.py's add_lora)
lora_rank = 0               # > 0: adapters of this rank; checkpoints then hold the adapters alone and name their base
lora_alpha = 32.0           # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0          # dropout on the adapters' input
lora_targets = "q,k,v,o,up,down"  # attention's q, k, v and output projections; the MLP's up and down projections
lora_merge = False          # the last checkpoint: the full model, the adapters merged into the base
quantize = ""               # QLoRA: the frozen base stored as int8 (per channel) or int4 (per group of 64 inputs)
device = ""
dtype = ""                  # bfloat16 | float32 | "": bfloat16 on CUDA and AMX CPUs, else float32
zero = 0                    # data parallelism: 0 replicated, 1 optimiser states sharded, 2 + gradients, 3 + weights
seed = 42
compile = False             # torch.compile the model for training (rows have one fixed length: one graph)
compile_generate = False    # decode through a torch.compile'd step (model.generate's compile): compiling takes
                            # tens of seconds on a CPU, paid back by long generations (tests/bench_generate.py)

# -----------------------------------------------------------------------------
# Data: render each conversation to (ids, mask), then pack several into fixed-length rows, best-fit from a small
# window; the rest of a row is padding, which is never trained on. A conversation longer than a row is truncated;
# if truncation leaves it nothing to train on it is skipped and counted (nanochat once trained on all-masked
# batches and divided by zero).


def render_all(tokenizer, conversations, row_len, train_everything):
    """(ids, mask) per conversation; returns them and the number skipped."""
    examples, skipped = [], 0
    for messages in conversations:
        try:
            ids, mask = tokenizer.render_conversation(messages, max_len=row_len)
        except ValueError:  # nothing trainable left after truncation
            skipped += 1
            continue
        examples.append((ids, [1] * len(ids) if train_everything else mask))
    return examples, skipped


def text_examples(tokenizer, num_tokens, row_len):
    """Pretraining documents as (ids, mask) examples with every token trained, num_tokens or a little more in all,
    from the first training file on: each after <|bos|> as pretraining reads it, cut to one row."""
    examples, total = [], 0
    for path in pretrain_files("train"):
        for text in iter_texts(path):
            if total >= num_tokens:
                return examples
            ids = tokenizer.encode(text, prepend=tokenizer.bos_id)[:row_len]
            examples.append((ids, [1] * len(ids)))
            total += len(ids) - 1  # the first token is no target
    return examples


def pack_rows(examples, row_len, pad_id, window=32):
    """Pack (ids, mask) examples, in order, into rows of row_len tokens: (inputs, targets) per row, where a target
    is -1 wherever the mask is 0 and on padding."""
    rows, pending, stream = [], [], iter(examples)
    while True:
        pending.extend(ex for _, ex in zip(range(window - len(pending)), stream))
        if not pending:
            return rows
        ids, mask = [], []
        while True:
            space = row_len - len(ids)
            fits = [i for i, (e, _) in enumerate(pending) if len(e) <= space]
            if not fits:
                break
            e_ids, e_mask = pending.pop(max(fits, key=lambda i: len(pending[i][0])))
            ids += e_ids
            mask += e_mask
            pending.extend(ex for _, ex in zip(range(1), stream))
        pad = row_len - len(ids)
        ids, mask = ids + [pad_id] * pad, mask + [0] * pad
        targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        rows.append((ids[:-1], targets))


def read_chats(path, tokenizer):
    """A user's conversations ({"messages": [...]} per line). Each is checked as the tokenizer renders it: a row
    that is not a conversation is a one-line error naming its line, not a skip (a mistake in a file would
    otherwise lose its data silently)."""
    conversations = []
    try:
        for i, row in iter_jsonl(path):
            messages = row.get("messages") if isinstance(row, dict) else None
            try:
                tokenizer.render_conversation(messages, max_len=1 << 30)
            except ValueError as e:
                raise ValueError(f'{path}, line {i}: {e} (a line is {{"messages": [{{"role": ..., "content": '
                                 f'...}}, ...]}})') from None
            conversations.append(messages)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON, not a conversation
        raise SystemExit(f"error: {e}") from None
    return conversations


def trainable_tokens(rows):
    return sum(sum(t >= 0 for t in targets) for _, targets in rows)

# -----------------------------------------------------------------------------
# Distillation: a teacher answers the train problems, the verifier keeps its right answers as conversations.


def reply_content(tokens, tokenizer):
    """A reply's tokens (its end token dropped) as an assistant message's content: a string, or text / python /
    python_output parts that render_conversation turns back into these tokens (up to BPE's choice of merges).
    None when special tokens appear outside a well-formed calculator call: such a reply is not learned from."""
    s = tokenizer.special
    calls = {s("<|python_start|>"): ("python", s("<|python_end|>")),
             s("<|output_start|>"): ("python_output", s("<|output_end|>"))}
    specials = set(tokenizer.special_tokens.values())
    parts, i = [], 0
    while i < len(tokens):
        # a part runs to the next special token: a call's own closing one, or the opening of what follows a text
        end = next((j for j in range(i + 1, len(tokens)) if tokens[j] in specials), len(tokens))
        if tokens[i] in calls:
            kind, close = calls[tokens[i]]
            if end == len(tokens) or tokens[end] != close:
                return None
            parts.append({"type": kind, "text": tokenizer.decode(tokens[i + 1:end])})
            end += 1
        elif tokens[i] in specials:
            return None
        else:
            parts.append({"type": "text", "text": tokenizer.decode(tokens[i:end])})
        i = end
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def verified_answers(group, tokenizer, keep):
    """What rejection sampling keeps of one problem's Samples: the right answers that ended their turn, each text
    once, at most `keep`, as assistant message contents."""
    end = tokenizer.special("<|assistant_end|>")
    kept, seen = [], set()
    for sample in group:
        if not (sample.correct and sample.tokens and sample.tokens[-1] == end):
            continue
        text = response_text(sample.tokens, tokenizer)
        content = reply_content(sample.tokens[:-1], tokenizer)
        if content is None or text in seen:
            continue
        seen.add(text)
        kept.append(content)
        if len(kept) == keep:
            break
    return kept


def distill_conversations(teacher, tokenizer, problems, autocast_ctx, rank, world_size, chunk=16):
    """The teacher's verified answers to `problems` ({"question", "answer"}) as conversations, every rank sampling
    its share and all of them returning the whole list in the same order."""
    engine = Engine(teacher, tokenizer, compile_generate)
    mine, kept = problems[rank::world_size], []
    for i in range(0, len(mine), chunk):
        part = mine[i:i + chunk]
        prompts = [tokenizer.render_for_completion([{"role": "user", "content": p["question"]}]) for p in part]
        with autocast_ctx:
            groups = sample_groups(engine, prompts, [p["answer"] for p in part], num_samples=distill_samples,
                                   max_new_tokens=distill_max_new_tokens, temperature=distill_temperature,
                                   top_k=50, seed=common.derive_seed(seed, "distill", i, rank), grader=grade)
        for problem, group in zip(part, groups):
            kept += [[{"role": "user", "content": problem["question"]}, {"role": "assistant", "content": content}]
                     for content in verified_answers(group, tokenizer, distill_keep)]
    if dist.is_initialized():
        gathered = [None] * world_size
        dist.all_gather_object(gathered, kept)
        kept = [conv for part in gathered for conv in part]
    return kept


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    config = common.configure(globals())
    common.check_settings(config, positive=("lr_scale", "lr", "num_epochs"), non_negative=("weight_decay",),
                          fraction=("warmdown_ratio", "text_mix"))
    if text_mix == 1:
        raise SystemExit("error: --text_mix=1 leaves no room for conversations (it is their share of text, < 1)")
    rank, world_size, device, dtype, autocast_ctx = common.start_stage(device, dtype, seed)
    stage = "mid" if mid else "sft"

    # ---- model, tokenizer
    if source not in ("base", "mid", "sft") and common.open_model_dir(source) is None:
        raise SystemExit(f"error: --source must be base, mid, sft, hf:<org>/<name> or a model folder, got {source!r}")
    source_tag = common.find_model_tag(source, model_tag)
    out_tag = out_tag or source_tag
    if source == stage and out_tag == source_tag:
        raise SystemExit(f"error: --source={source} would save over the model it starts from: give --out_tag")
    model, tokenizer, source_meta = common.load_model(source, device, source_tag)  # fp32 weights (+ autocast)
    model_config = model.config
    if max_seq_len > model_config.sequence_len:
        print0(f"note: max_seq_len {max_seq_len} > the model's {model_config.sequence_len}; RoPE extends to it")
    ckpt_dir = common.checkpoint_dir(stage, out_tag)
    lora_meta = common.setup_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets, quantize, lora_merge,
                                  {"stage": source, "model_tag": source_tag, "step": source_meta["step"]}, seed)

    # ---- data
    train_convs, val_convs = load_conversations("train") if mixture else [], load_conversations("val")
    for path in filter(None, data.split(",")):
        if not os.path.exists(path):
            raise SystemExit(f"error: --data file {path} not found")
        train_convs += read_chats(path, tokenizer)
    if distill_from:
        # the teacher's verified answers, kept in a file too; the teacher leaves memory before training starts
        t0 = time.time()
        teacher, _, teacher_meta = common.load_model(distill_from, device, distill_tag)
        if teacher_meta.get("tokenizer_hash") != source_meta.get("tokenizer_hash"):
            raise SystemExit(f"error: the teacher ({distill_from}) was trained with another tokenizer than the "
                             f"student ({source}): its answers' tokens would mean other text")
        try:
            problems = load_math(distill_dataset, "train")
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        if distill_problems > 0:
            problems = random.Random(common.derive_seed(seed, "distill")).sample(
                problems, min(distill_problems, len(problems)))
        distilled = distill_conversations(teacher, tokenizer, problems, autocast_ctx, rank, world_size)
        del teacher
        path = os.path.join(common.get_base_dir(), "data", "distill", f"{distill_from}_"
                            f"{common.find_model_tag(distill_from, distill_tag)}_{teacher_meta['step']}.jsonl")
        if rank == 0:
            write_jsonl(path, [{"messages": conv} for conv in distilled])
        solved = len({conv[0]["content"] for conv in distilled})
        print0(f"distill: {len(distilled)} verified answers to {solved} of {len(problems)} problems "
               f"({distill_samples} sampled each, {time.time() - t0:.0f}s) -> {path}")
        train_convs += distilled
    if not train_convs:
        raise SystemExit("error: no conversations to train on (--mixture=0 with no --data, and no teacher answer "
                         "was right)")
    random.Random(seed).shuffle(train_convs)
    row_len = max_seq_len + 1
    train_examples, skipped = render_all(tokenizer, train_convs, row_len, mid)
    val_examples, _ = render_all(tokenizer, val_convs, row_len, mid)
    if not train_examples:
        raise SystemExit(f"error: none of the {len(train_convs)} conversations has a trainable token within "
                         f"max_seq_len={max_seq_len}")
    num_texts = 0
    if text_mix > 0:
        chat_tokens = sum(sum(mask[1:]) for _, mask in train_examples)
        texts = text_examples(tokenizer, round(chat_tokens * text_mix / (1 - text_mix)), row_len)
        num_texts = len(texts)
        train_examples += texts
        random.Random(seed).shuffle(train_examples)  # texts spread over the whole run
    train_rows = pack_rows(train_examples, row_len, tokenizer.bos_id)
    val_rows = pack_rows(val_examples, row_len, tokenizer.bos_id)[:eval_rows]
    print0(f"data: {len(train_examples) - num_texts} train conversations ({skipped} skipped: nothing trainable "
           f"within max_seq_len) + {num_texts} pretraining documents -> {len(train_rows)} rows, "
           f"{trainable_tokens(train_rows):,} trainable tokens; {len(val_rows)} val rows")

    # ---- batch geometry and horizon
    grad_accum_steps = common.grad_accum_steps(total_batch_size, device_batch_size, max_seq_len, world_size)
    rows_per_micro_step = device_batch_size * world_size
    rows_per_step = rows_per_micro_step * grad_accum_steps
    num_steps = num_iterations if num_iterations > 0 else max(1, math.ceil(num_epochs * len(train_rows) / rows_per_step))
    print0(f"{num_steps} steps of {rows_per_step} rows ({grad_accum_steps} accumulation steps)")

    def epoch_order(epoch, cache={}):
        """Row order of an epoch: packing order first, then a fresh shuffle at every wrap."""
        if epoch not in cache:
            order = list(range(len(train_rows)))
            if epoch:
                random.Random(seed + epoch).shuffle(order)
            cache.clear()
            cache[epoch] = order
        return cache[epoch]

    def step_rows(step):
        """All rows of a step, identical on every rank (each rank then takes its own slice)."""
        return [train_rows[epoch_order(i // len(train_rows))[i % len(train_rows)]]
                for i in range(step * rows_per_step, (step + 1) * rows_per_step)]

    def to_batch(rows):
        x = common.to_device(torch.tensor([r[0] for r in rows], dtype=torch.long), device)  # (B, T)
        y = common.to_device(torch.tensor([r[1] for r in rows], dtype=torch.long), device)  # (B, T)
        return x, y

    # ---- data parallelism and optimisers; a resume may run on another number of ranks (step_rows is the same)
    optimizers = common.stage_optimizers(model, zero, optimizer, lr, lr_scale, weight_decay,
                                         source_meta.get("open_model"))
    step, history, _ = common.resume_stage(resume, ckpt_dir, model, optimizers, rank, device, {
        "total_batch_size": total_batch_size, "optimizer": optimizer}, history={"loss": [], "val_loss": []})

    @torch.no_grad()
    def val_loss():
        nats = torch.zeros((), dtype=torch.float64, device=device)  # on the device until the one read below
        count = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(rank * device_batch_size, len(val_rows), rows_per_micro_step):
            x, y = to_batch(val_rows[i:i + device_batch_size])
            with autocast_ctx:
                loss = model(x, y, loss_reduction="none")  # (B, T), 0 where the target is -1
            nats += loss.float().sum()
            count += (y >= 0).sum()
        total = common.all_sum({"nats": nats, "count": count}, device)
        return total["nats"] / max(total["count"], 1)

    def samples():
        engine = Engine(model, tokenizer, compile_generate)
        convs = [c for c in val_convs[:3]]
        prompts = [tokenizer.render_for_completion(c[:1] if c[0]["role"] != "system" else c[:2]) for c in convs]
        with autocast_ctx:
            outs = engine.generate_batch(prompts, num_samples=1, max_new_tokens=64, temperature=0.0)
        for conv, out in zip(convs, outs):
            question = conv[0]["content"] if isinstance(conv[0]["content"], str) else str(conv[0]["content"])
            print0(f"  Q: {question[:100]!r}\n  A: {tokenizer.decode(out[0][0])[:200]!r}")

    def save(step, metrics):
        common.save_stage(ckpt_dir, step, model, optimizers, rank, {
            "config": config, "metrics": metrics, "history": history, "tokenizer_hash": tokenizer.hash,
            "source": source, "open_model": source_meta.get("open_model"), **lora_meta})

    # ---- the training loop (evaluation and sampling use the eager model: their shapes vary)
    train_model = torch.compile(model, dynamic=False) if compile else model
    t_start, metrics, last_val = time.time(), {}, None
    model.train()
    while True:
        last = step == num_steps
        if eval_every > 0 and (step % eval_every == 0 or last):
            model.eval()
            with common.unsharded(model):  # ranks may have different numbers of val rows; rank 0 alone samples
                last_val = val_loss()
                history["val_loss"].append((step, last_val))
                print0(f"step {step:05d} | val loss {last_val:.4f}")
                if rank == 0 and not mid:
                    samples()
            model.train()
        if last:
            break
        t0 = time.time()
        lrm = 1.0 if step < num_steps * (1 - warmdown_ratio) else (num_steps - step) / (num_steps * warmdown_ratio)
        common.set_lr(optimizers, lrm)
        rows = step_rows(step)
        # normalise by the trainable tokens of the whole step (all ranks): every token weighs the same, and a
        # micro-batch with none contributes zero gradient instead of 0/0 = NaN
        n_train = trainable_tokens(rows)
        mine = rows[rank * grad_accum_steps * device_batch_size:(rank + 1) * grad_accum_steps * device_batch_size]
        loss_sum = torch.zeros((), device=device)  # on the device: all_sum below is the step's one host read
        for a in range(grad_accum_steps):
            x, y = to_batch(mine[a * device_batch_size:(a + 1) * device_batch_size])
            with autocast_ctx:
                # this rank's share of the mean
                loss = train_model(x, y, loss_reduction="none").sum() / max(n_train, 1)
            (loss * world_size).backward()  # the optimisers average over ranks; undo that for a sum over ranks
            loss_sum += loss.detach()
        totals = common.all_sum({"loss": loss_sum, "gradient": common.largest_grad(model)}, device)
        common.check_finite(step + 1, totals, "--lr or --lr_scale")
        loss_sum = totals["loss"]  # each rank's share of the mean, summed
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        step += 1
        history["loss"].append((step, loss_sum))
        dt = time.time() - t0
        print0(f"step {step:05d}/{num_steps:05d} | loss {loss_sum:.6f} | lr x{lrm:.3f} | "
               f"trainable tokens {n_train} | {dt * 1000:.0f} ms")
        metrics = {"loss": loss_sum, "val_loss": last_val}
        if save_every > 0 and step % save_every == 0 and step < num_steps:
            save(step, metrics)

    metrics.update(val_loss=last_val, minutes=(time.time() - t_start) / 60, skipped_conversations=skipped)
    if lora_merge:  # the last checkpoint: the full model, the adapters folded into the base
        merge_lora(model)
        lora_meta = {"merged_lora": lora_meta["lora"]}
    save(step, metrics)
    common.finish_stage(stage, {"stage": stage, "config": config, "metrics": metrics, "history": history,
                                "checkpoint": ckpt_dir}, rank)
