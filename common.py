"""
Shared plumbing for every picochat stage: the --key=value configurator, device and distributed setup,
atomic file writes, checkpoints, the skeleton of a training stage, and the report sections each stage leaves.

Nothing here knows about a particular stage. A training stage (pretrain.py, sft.py, rl.py, dpo.py) does, in order:

    config = common.configure(globals())          # module globals <- config file and --key=value
    rank, world_size, device, dtype, autocast_ctx = common.start_stage(device, dtype, seed)
    grad_accum_steps = common.grad_accum_steps(total_batch_size, device_batch_size, max_seq_len, world_size)
    optimizers = common.parallelize(model, zero, ...)  # data parallelism at --zero level 0-3, the optimisers
    ...                                           # its training loop: common.set_lr, common.all_sum
    common.save_stage(ckpt_dir, step, model, optimizers, rank, meta)
    common.finish_stage("base", report_section, rank)
"""

import ast
import contextlib
import glob
import hashlib
import json
import math
import os
import pickle
import platform
import random
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig, add_lora, is_dtensor, load_lora_state_dict, lora_state_dict, merge_lora, param_floor

# -----------------------------------------------------------------------------
# The artifacts directory: everything a run produces lives under it.


def get_base_dir():
    """$PICOCHAT_DIR, or ~/.cache/picochat; created on first use."""
    base = os.environ.get("PICOCHAT_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "picochat")
    os.makedirs(base, exist_ok=True)
    return base


def is_rank0():
    # RANK is set by torchrun before the process group exists, so this works before setup_device() too
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# The configurator (nanoGPT's idea, with type checks): a script's lowercase module globals of type
# int/float/bool/str are its config. `python x.py [config_file.py] --key=value ...` overrides them.

CONFIG_TYPES = (bool, int, float, str)


def config_keys(g):
    """The overridable settings of a script's globals: lowercase, public, of a plain type."""
    return {k: v for k, v in g.items()
            if not k.startswith("_") and not k.isupper() and type(v) in CONFIG_TYPES}


def parse_value(key, raw, default):
    """Convert the text after `--key=` to the type of the default, or exit with one line naming the key."""
    want = type(default)
    if want is bool:
        low = raw.strip().lower()
        if low in ("1", "true"):
            return True
        if low in ("0", "false"):
            return False
        raise SystemExit(f"error: --{key} expects a bool (1/0/true/false), got {raw!r}")
    if want is str:
        # a quoted string is unquoted; anything else is taken as written (paths, names, `a=b`)
        try:
            value = ast.literal_eval(raw)
            return value if isinstance(value, str) else raw
        except (ValueError, SyntaxError):
            return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise SystemExit(f"error: --{key} expects {want.__name__}, got {raw!r}") from None
    return check_value(key, value, default, raw)


def check_value(key, value, default, shown):
    """A setting's value (a Python literal) if it has the type of the default; else exit with one line. A float
    must be finite: `--matrix_lr=1e999` reads as inf, and a run with it writes a NaN model."""
    want = type(default)
    if want is bool and type(value) is int and value in (0, 1):
        value = bool(value)  # a config file may say 1/0, as the command line does
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:  # bool is not accepted for an int: `--depth=True` is a mistake
        kind = "a bool (1/0/true/false)" if want is bool else want.__name__
        raise SystemExit(f"error: --{key} expects {kind}, got {shown!r}")
    if want is float and not math.isfinite(value):
        raise SystemExit(f"error: --{key} must be a finite number, got {shown!r}")
    return value


def read_config_file(path, defaults):
    """The settings of a config file, {key: value}. The file is read as data, never run: it may hold only
    `key = value` lines with literal values (numbers, strings, True/False), comments and blank lines."""
    valid = ", ".join(sorted(defaults))
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise SystemExit(f"error: config file {path}, line {e.lineno}: {e.msg} (a config file holds "
                         f"`key = value` lines)") from None
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, NUL bytes
        raise SystemExit(f"error: cannot read config file {path}: {e}") from None
    settings = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise SystemExit(f"error: config file {path}, line {node.lineno}: only `key = value` lines are allowed "
                             f"(the file is read as data, never run)")
        key = node.targets[0].id
        if key not in defaults:
            raise SystemExit(f"error: unknown config key '{key}' in {path}, line {node.lineno}; valid keys: {valid}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise SystemExit(f"error: config file {path}, line {node.lineno}: the value of {key} must be a literal "
                             f"(a number, a string, True or False), not an expression") from None
        settings[key] = check_value(key, value, defaults[key], ast.get_source_segment(source, node.value))
    return settings


def configure(g, argv=None):
    """Override the settings in `g` (a script's globals()) and return the final config as a dict."""
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = config_keys(g)
    valid = ", ".join(sorted(defaults))
    for arg in argv:
        if arg in ("-h", "--help"):
            print("settings (override with --key=value):")
            for k in sorted(defaults):
                print(f"  --{k}={defaults[k]!r}")
            raise SystemExit(0)
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"error: config file {arg!r} not found (settings are given as --key=value)")
            g.update(read_config_file(arg, defaults))
            continue
        key, sep, raw = arg[2:].partition("=")  # partition: values may themselves contain '='
        if key not in defaults:
            raise SystemExit(f"error: unknown config key '{key}'; valid keys: {valid}")
        if not sep:
            raise SystemExit(f"error: --{key} needs a value: --{key}=VALUE")
        g[key] = parse_value(key, raw, defaults[key])
    config = config_keys(g)
    print0("config: " + " ".join(f"{k}={config[k]!r}" for k in sorted(config)))
    return config


def check_settings(config, positive=(), non_negative=(), fraction=()):
    """Refuse, in one line naming each, the settings out of their range: those that must be > 0 (learning rates,
    sizes), >= 0 or within [0, 1] (ratios). Before anything is spent; configure has refused inf and nan already."""
    errors = [f"--{k} must be > 0, got {config[k]}" for k in positive if not config[k] > 0]
    errors += [f"--{k} must be >= 0, got {config[k]}" for k in non_negative if not config[k] >= 0]
    errors += [f"--{k} must be within [0, 1], got {config[k]}" for k in fraction if not 0 <= config[k] <= 1]
    if errors:
        raise SystemExit("error: " + "; ".join(errors))


# -----------------------------------------------------------------------------
# Device and distributed setup


def setup_device(device=""):
    """Pick the device (cuda > mps > cpu unless given) and, under torchrun, join the process group.
    Returns (ddp, rank, local_rank, world_size, device)."""
    if not device:
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if not re.fullmatch(r"cuda(:\d+)?|mps|cpu", device):
        raise SystemExit(f"error: --device must be cuda, mps or cpu, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={device} but this torch finds no CUDA GPU (torch {torch.__version__}); "
                         f"use --device=cpu, or leave --device empty for the best available")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device={device} but there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device=mps but MPS (Apple GPU) is not available here; use --device=cpu")
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this node (torchrun sets it)
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        world_size = int(os.environ["WORLD_SIZE"])
        on_node = max(local_world, local_rank + 1)
        if device.startswith("cuda") and on_node > torch.cuda.device_count():
            # every rank stops here: one that went on would wait in init_process_group for the missing ones
            raise SystemExit(f"error: {on_node} processes on this node but {torch.cuda.device_count()} CUDA GPUs "
                             f"(one each); use --nproc_per_node={torch.cuda.device_count()}, or --device=cpu (gloo)")
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
            init_process_group(backend="nccl", device_id=torch.device(device))
        elif device == "cpu":
            init_process_group(backend="gloo")
        else:
            raise SystemExit(f"error: distributed training needs cuda or cpu, not {device}")
    if device == "cpu":
        # torchrun sets OMP_NUM_THREADS=1 when several processes share a machine; respect an explicit value,
        # otherwise give each local process an equal share of the cores
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    print0(f"device: {device}" + (f", {world_size} processes" if ddp else ""))
    return ddp, rank, local_rank, world_size, torch.device(device)


def init_process_group(**kwargs):
    """dist.init_process_group(**kwargs), torch._dynamo imported first. Imported while a group exists (building any
    torch.optim optimizer imports it), torch._dynamo keeps references to the group (torch 2.13, measured), so that
    destroy_process_group no longer frees gloo's backend: its threads live on into interpreter shutdown, where Python
    (< 3.14) ends a thread that takes the GIL with pthread_exit, which aborts the process ("terminate called without
    an active exception", SIGABRT; pytorch/pytorch#38228). Imported before the group, it holds none. Not at the top
    of this file: the import takes seconds, and a single process needs no group."""
    import torch._dynamo as _  # noqa: F401  (as _: a plain import would make torch a local name here)
    dist.init_process_group(**kwargs)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(numbers, device):
    """Sum named numbers over ranks: {name: number or 0-dim tensor} -> {name: float}; without DDP they come back as
    they are. Tensors stay where they are computed until here, and all of them are read in one go: a training
    step that keeps its losses on the GPU and calls this once syncs the host once, not once per micro-batch.
    One all-reduce for all of them; device: where this rank's collectives run (a CUDA device under NCCL)."""
    tensors = {name: value.detach().reshape(()) for name, value in numbers.items() if torch.is_tensor(value)}
    floats = {name: float(value) for name, value in numbers.items() if name not in tensors}
    if dist.is_initialized():
        host = torch.tensor(list(floats.values()), dtype=torch.float64)  # (F,)
        t = torch.cat([to_device(host, device), *(v.to(device, torch.float64)[None] for v in tensors.values())])
        dist.all_reduce(t)
        summed = dict(zip([*floats, *tensors], t.tolist()))
    else:
        read = torch.stack([v.double() for v in tensors.values()]).tolist() if tensors else []  # the one host read
        summed = {**floats, **dict(zip(tensors, read))}
    return {name: summed[name] for name in numbers}


def to_device(tensor, device):
    """A host tensor (a batch) on `device` without stalling the host: on CUDA through pinned memory and
    non_blocking, because a plain .to() from pageable memory waits for the copy (a host sync per batch)."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def all_max(numbers, device):
    """The largest of named numbers over ranks: {name: number} -> {name: float}, as all_sum."""
    if not dist.is_initialized():
        return {name: float(value) for name, value in numbers.items()}
    t = torch.tensor(list(numbers.values()), dtype=torch.float64, device=device)  # (N,)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(numbers, t.tolist()))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_fast_bf16():
    """bf16 matmuls are fast on CPUs that oneDNN runs natively in bf16 (AVX512-BF16, AMX); elsewhere they are
    emulated: we measured a 1024^2 bf16 matmul 70x slower than fp32 on an AVX2-only AMD EPYC."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(device, dtype_name=""):
    """The compute dtype: as given, or '' for bfloat16 where it is fast (CUDA, AMX CPUs) and float32 elsewhere."""
    if dtype_name not in ("", "bfloat16", "float32"):
        raise SystemExit(f"error: --dtype must be bfloat16 or float32 (or empty: automatic), got {dtype_name!r}")
    if dtype_name:
        return dtype_name
    device_type = torch.device(device).type
    fast = device_type == "cuda" or (device_type == "cpu" and cpu_has_fast_bf16())
    return "bfloat16" if fast else "float32"


def autocast(device, dtype_name):
    """bf16 autocast (matmuls in bf16, reductions in fp32) or plain fp32; dtype_name '' resolves automatically."""
    if resolve_dtype(device, dtype_name) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


# -----------------------------------------------------------------------------
# Atomic writes: a reader sees the old file or the whole new one, never a half-written one.


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path next to `path`; rename it into place only if the block finishes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# -----------------------------------------------------------------------------
# Checkpoints: checkpoints/<stage>/<model_tag>/{model_S.pt, optim_S_rankR.pt, meta_S.json}.
# The meta file is written last, after every rank's files: a step exists only once its meta does,
# so a run killed mid-save leaves the previous checkpoint as the latest.


def checkpoint_dir(stage, model_tag):
    return os.path.join(get_base_dir(), "checkpoints", stage, model_tag)


def all_steps(ckpt_dir):
    """The complete steps in ckpt_dir (those with a meta file), in order."""
    return sorted(int(m.group(1)) for p in glob.glob(os.path.join(ckpt_dir, "meta_*.json"))
                  if (m := re.search(r"meta_(\d+)\.json$", p)))


def last_step(ckpt_dir):
    """The latest complete step in ckpt_dir, or None."""
    steps = all_steps(ckpt_dir)
    return steps[-1] if steps else None


def save_checkpoint(ckpt_dir, step, model_state, rank_state, meta, rank=0, keep=2):
    """Save one step: the model (rank 0), each rank's own state (optimiser, data position, RNG), then the
    meta JSON. Older steps beyond the last `keep` are deleted."""
    os.makedirs(ckpt_dir, exist_ok=True)
    if rank == 0:
        atomic_torch_save(model_state, os.path.join(ckpt_dir, f"model_{step:06d}.pt"))
    if rank_state is not None:
        atomic_torch_save(rank_state, os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()  # every rank's file is on disk before the meta makes the step visible
    if rank == 0:
        atomic_write_text(os.path.join(ckpt_dir, f"meta_{step:06d}.json"), json.dumps(meta, indent=2))
        steps = all_steps(ckpt_dir)
        for old in steps[:-keep] if keep > 0 else []:
            os.remove(os.path.join(ckpt_dir, f"meta_{old:06d}.json"))  # meta first: the step vanishes at once
            for p in glob.glob(os.path.join(ckpt_dir, f"*_{old:06d}*.pt")):
                os.remove(p)
    if dist.is_initialized():
        dist.barrier()


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def read_torch_file(path, device="cpu"):
    """A .pt file of tensors and plain data (dicts, lists, numbers, strings), as every checkpoint file is.
    weights_only=True builds nothing else, so a file that asks for any other object (a pickle payload that would
    run code) is refused before anything of it runs. Raises ValueError naming the file and what is wrong."""
    name = os.path.basename(path)
    if not os.path.exists(path):
        raise ValueError(f"{name} is missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. on a pickle protocol torch does not write: it is refused anyway
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{name} was refused: it holds more than tensors and plain data"
                         + (f" (it asks for {wanted[1]})" if wanted else "") + ", as a crafted or foreign file "
                         "does") from None
    except Exception as e:  # anything a truncated, emptied or garbage file makes torch.load raise
        raise ValueError(f"{name} is unreadable, truncated or not a checkpoint ({type(e).__name__}: "
                         f"{first_line(e)})") from None


def read_step(ckpt_dir, step, rank, device, load_rank_state):
    """(model_state, rank_states or None, meta) of one step, each file checked; ValueError names a damaged one.
    rank_states: every saved rank's own state, in rank order (rank 0's also holds the whole optimiser states), on
    the CPU (each rank moves only its share onto its device); the saved run may have had another number of ranks."""
    name = f"meta_{step:06d}.json"
    try:
        with open(os.path.join(ckpt_dir, name), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name} is unreadable ({first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("step") != step:
        raise ValueError(f"{name} is not the meta of step {step}")
    model_state = read_torch_file(os.path.join(ckpt_dir, f"model_{step:06d}.pt"), device)
    if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
        raise ValueError(f"model_{step:06d}.pt is not a model's weights")
    rank_states = None
    if load_rank_state:
        rank_states = []
        for r in range(meta.get("world_size", 1)):
            path = os.path.join(ckpt_dir, f"optim_{step:06d}_rank{r}.pt")
            rank_states.append(read_torch_file(path))
            if not isinstance(rank_states[-1], dict):
                raise ValueError(f"{os.path.basename(path)} is not a rank's state")
    return model_state, rank_states, meta


def load_checkpoint(ckpt_dir, step=-1, rank=0, device="cpu", load_rank_state=True, validate=None):
    """Returns (model_state, rank_states or None, meta) of `step`, or of the latest intact step (-1); rank_states:
    every saved rank's own state (read_step).

    Every file is checked before anything uses it (read_step), then validate(model_state, rank_state, meta) may
    raise ValueError (e.g. weights that do not fit their model). A damaged latest step is reported in one line
    and the step before it is tried, and so on; a damaged step asked for by number, or no intact step at all, is
    a one-line error. With load_rank_state (a resume, which every rank does) the ranks agree on the step."""
    steps = [step] if step >= 0 else all_steps(ckpt_dir)[::-1]
    if not steps:
        raise SystemExit(f"error: no checkpoint in {ckpt_dir}")
    if not os.path.exists(os.path.join(ckpt_dir, f"meta_{steps[0]:06d}.json")):
        raise SystemExit(f"error: no checkpoint for step {step} in {ckpt_dir}")
    for s in steps:
        try:
            loaded = read_step(ckpt_dir, s, rank, device, load_rank_state)
            if validate is not None:
                validate(*loaded)
            damage = ""
        except ValueError as e:
            damage = str(e)
        if load_rank_state and all_sum({"damaged": bool(damage)}, device)["damaged"]:
            damage = damage or "another rank's file of it is damaged"
        if not damage:
            return loaded
        if step >= 0:
            raise SystemExit(f"error: step {s} of {ckpt_dir} is damaged: {damage}")
        print0(f"warning: step {s} of {ckpt_dir} is damaged ({damage}); falling back to the step before it")
    raise SystemExit(f"error: no intact checkpoint in {ckpt_dir}: every step is damaged; train again, or delete "
                     f"the folder")


def resume_checkpoint(ckpt_dir, model, optimizers, rank, device, must_match):
    """Restore the latest intact checkpoint of ckpt_dir into model and optimizers, after checking that the
    settings a resume depends on agree. must_match: {name: this run's value}, compared with the meta's `name`
    (or its config's). The model and optimizers may be sharded at any --zero level, on another number of ranks
    than the saved run: the checkpoint holds them whole and each rank takes its share. Returns (meta,
    rank_states): every saved rank's own state, from which the caller restores what else it saved (data
    position)."""
    def restore(model_state, rank_states, meta):
        for name, ours in must_match.items():
            saved = meta[name] if name in meta else meta.get("config", {}).get(name)
            if saved != ours:
                raise SystemExit(f"error: the checkpoint in {ckpt_dir} is of another {name.replace('_', ' ')} "
                                 f"({saved!r}, this run {ours!r}); resume with the same settings or another "
                                 f"--model_tag")
        try:  # a damaged step may leave the model half-loaded: the step before it then loads over all of it
            load_model_state(model, model_state, ckpt_dir)
            for opt, opt_state in zip(optimizers, rank_states[0]["optimizers"], strict=True):
                ours = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                opt.load_state_dict(opt_state)
                # load_state_dict brings back the saved learning rates too; this run's settings win, so that a
                # run that diverged can resume with a lower one (the same settings give the same values)
                for group, settings in zip(opt.param_groups, ours, strict=True):
                    group.update(settings)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"it does not fit this model and its optimisers ({first_line(e)})") from None

    _, rank_states, meta = load_checkpoint(ckpt_dir, rank=rank, device=device, validate=restore)
    print0(f"resumed from {ckpt_dir} at step {meta['step']}")
    return meta, rank_states


def resume_stage(resume, ckpt_dir, model, optimizers, rank, device, must_match, history):
    """Where a stage's loop starts: (step, history, rank_states). With resume and a checkpoint in ckpt_dir, those of
    the latest one, restored into model and optimizers by resume_checkpoint (rank_states: every saved rank's own
    state, see there); else step 0, the given history and None."""
    if resume and last_step(ckpt_dir) is not None:
        meta, rank_states = resume_checkpoint(ckpt_dir, model, optimizers, rank, device, must_match)
        return meta["step"], meta["history"], rank_states
    if resume:
        print0(f"nothing to resume in {ckpt_dir}: starting from step 0")
    return 0, history, None


def hf_model_dir(repo):
    """$PICOCHAT_DIR/models/<org>__<name>: where data/hf_model.py puts an open model's files."""
    return os.path.join(get_base_dir(), "models", repo.replace("/", "__"))


def open_model_dir(source):
    """The Hugging Face model folder a stage's --source names: hf:<org>/<name> (downloaded by data/hf_model.py) or a
    path with a "/" to a folder of config.json, tokenizer.json and safetensors. None for anything else (a
    stage: base, mid, sft, rl)."""
    if source.startswith("hf:"):
        folder, hint = hf_model_dir(source[3:]), f"download it: python data/hf_model.py --model={source[3:]}"
    elif "/" in source or os.sep in source:
        folder, hint = os.path.abspath(source), "a Hugging Face model folder holds config.json and tokenizer.json"
    else:
        return None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise SystemExit(f"error: no open model in {folder} ({hint})")
    return folder


def find_model_tag(stage, model_tag=""):
    """The given tag, or the tag of the stage's most recently saved checkpoint (an open model: its folder's name)."""
    stage_dir = os.path.join(get_base_dir(), "checkpoints", stage)
    if model_tag:
        return model_tag
    folder = open_model_dir(stage)
    if folder is not None:
        return os.path.basename(folder)
    metas = glob.glob(os.path.join(stage_dir, "*", "meta_*.json"))
    if not metas:
        raise SystemExit(f"error: no {stage} checkpoint under {stage_dir}; train one first "
                         f"({'python pretrain.py' if stage == 'base' else f'python {stage}.py'})")
    return os.path.basename(os.path.dirname(max(metas, key=os.path.getmtime)))


def load_model_state(model, state, ckpt_dir):
    """A checkpoint's model state into the model: its adapters alone when the model has LoRA (setup_lora)."""
    if model.lora is None:
        if any(name.endswith(".lora_A") for name in state):
            raise SystemExit(f"error: {ckpt_dir} holds LoRA adapters: resume with the same --lora_rank")
        if is_dtensor(next(model.parameters())):  # --zero=3: torch's engine gives each rank its slices
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state)
        return
    try:
        load_lora_state_dict(model, state)
    except ValueError as e:
        raise SystemExit(f"error: {ckpt_dir}: {e}; resume with the same LoRA settings or another --model_tag") from None


def load_model(source, device="cpu", model_tag="", step=-1, dtype=torch.float32):
    """The model of a saved stage (base/mid/sft/rl), or an open model (hf:<org>/<name> or a folder, see
    open_model_dir), with its tokenizer, its weights in `dtype`. Returns (model, tokenizer, meta). step -1: the
    latest intact step (a damaged one is reported, and the one before it loaded). An open model's meta is
    {"step": 0, "open_model": {"source", "folder"}}; stages that train it keep "open_model" in their checkpoints'
    meta, so those load back with the open model's tokenizer (its hash checked). A checkpoint of LoRA adapters (meta
    "lora") loads the base it names (quantized as it was trained, for QLoRA) and merges them in."""
    from tokenizer import load_tokenizer  # here, not at the top: tokenizer.py imports this module
    folder = open_model_dir(source)
    if folder is not None:
        try:
            model, tokenizer = GPT.from_pretrained(folder, device, dtype), load_tokenizer(folder)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise SystemExit(f"error: {e}") from None
        print0(f"loaded open model {source} from {folder} ({model.num_params() / 1e6:.0f}M parameters, {dtype})")
        return model, tokenizer, {"step": 0, "open_model": {"source": source, "folder": folder}}
    ckpt_dir = checkpoint_dir(source, find_model_tag(source, model_tag))

    built = []  # the model of the step that loads

    def build(model_state, _, meta):
        if "lora" in meta:
            lora, base = meta["lora"], meta["lora"]["base"]
            model, _, _ = load_model(base["stage"], device, base["model_tag"], base["step"], dtype)
            # QLoRA's adapters go on the base as it trained them, quantized (then de-quantized whole by the
            # merge): the function trained, as --lora_merge=1 saves it, not its adapters on the unrounded base
            add_lora(model, lora["rank"], lora["alpha"], 0.0, lora["targets"], lora["quantize"], lora["group_size"])
            load_model_state(model, model_state, ckpt_dir)
            built.append(merge_lora(model))
            return
        try:
            with torch.device("meta"):  # allocated once, then filled: an open model's size is not built twice
                model = GPT(GPTConfig(**meta["model_config"])).to(dtype)
            model.to_empty(device=device)
            model.tie_weights()
            model.fill_rotary()
            model.load_state_dict(model_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"its weights do not fit its model config ({first_line(e)})") from None
        built.append(model)

    _, _, meta = load_checkpoint(ckpt_dir, step, device=device, load_rank_state=False, validate=build)
    tokenizer_dir = open_model_dir(meta["open_model"]["source"]) if meta.get("open_model") else None
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if meta.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise SystemExit(f"error: {ckpt_dir} was trained with another tokenizer than the one in "
                         f"{tokenizer_dir or os.path.join(get_base_dir(), 'tokenizer')}")
    model = built[-1]
    model.eval()
    print0(f"loaded {source} model from {ckpt_dir} (step {meta['step']})" +
           (f": LoRA adapters of rank {meta['lora']['rank']}, merged into their "
            f"{meta['lora']['quantize'] + ' ' if meta['lora']['quantize'] else ''}base" if "lora" in meta else ""))
    return model, tokenizer, meta


# -----------------------------------------------------------------------------
# The stage skeleton: what every training stage does around its loop, in the order it does it. The loop itself
# stays in the stage's script.


class Stage(NamedTuple):
    rank: int
    world_size: int
    device: torch.device
    dtype: str  # the compute dtype, resolved: bfloat16 or float32
    autocast: contextlib.AbstractContextManager  # bf16 autocast, or a no-op for float32


def start_stage(device="", dtype="", seed=0):
    """A stage's start: the device (joining the process group under torchrun), the seed (the same on every rank)
    and the compute dtype with its autocast context."""
    _, rank, _, world_size, device = setup_device(device)
    seed_everything(seed)
    if device.type == "cpu":
        # The same run twice gives the same model. Without this, a compiled backward on several threads adds an
        # embedding's gradient rows with atomic adds in an order that changes from run to run: we measured
        # pretraining losses apart from the 3rd step, and two cpu-preset runs of one config 0.14 apart on
        # held-back arithmetic. On CPU it cost no measurable speed; on GPUs it costs speed (and cuBLAS settings),
        # so it stays off there. warn_only: an op with no deterministic CPU kernel warns instead of stopping a run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    dtype = resolve_dtype(device, dtype)
    print0(f"compute dtype: {dtype}")
    return Stage(rank, world_size, device, dtype, autocast(device, dtype))


def grad_accum_steps(total_batch_size, device_batch_size, max_seq_len, world_size):
    """Micro-batches per rank and step, so that a step is total_batch_size tokens whatever the number of
    processes; a total that does not divide is a one-line error."""
    sizes = {"total_batch_size": total_batch_size, "device_batch_size": device_batch_size, "max_seq_len": max_seq_len}
    for name, value in sizes.items():
        if value < 1:  # 0 divides by zero, a negative size makes a negative number of micro-batches
            raise SystemExit(f"error: --{name} must be at least 1, got {value}")
    tokens_per_micro_step = device_batch_size * max_seq_len * world_size
    if total_batch_size % tokens_per_micro_step:
        raise SystemExit(f"error: --total_batch_size={total_batch_size} is not a multiple of device_batch_size * "
                         f"max_seq_len * world_size = {tokens_per_micro_step}")
    return total_batch_size // tokens_per_micro_step


def parallelize(model, zero=0, optimizer="muon", **optimizer_settings):
    """Data parallelism for a stage's model at ZeRO level `zero`, and its optimisers (model.setup_optimizers, or
    model.setup_adamw for optimizer "adamw", with optimizer_settings): 0 replicates everything (the optimisers
    average the gradients), 1 shards the optimiser states, 2 the gradients too, 3 the weights too, with FSDP2: the
    embedding (unless tied to the head) and each block are units of their own (a unit's whole weights exist only
    around its forward and its backward), the head and the rest the root's (the kernels' fused loss reads the head's
    weight outside its forward). model.py's Optimisers say who holds what. Every rank runs as many forward/backward
    passes from level 2 on (each is a collective), and evaluation or generation that differs by rank runs inside
    `unsharded(model)`. One process has nothing to shard: the level changes nothing."""
    if zero not in (0, 1, 2, 3):
        raise SystemExit(f"error: --zero must be 0, 1, 2 or 3, got {zero}")
    if zero and not dist.is_initialized():
        print0(f"note: --zero={zero} shards over processes (torchrun); one process holds everything")
        zero = 0
    if zero == 3:  # imported here: torch's sharding engines cost about 1 s of CPU to import (model.py, Optimisers)
        from torch.distributed.fsdp import fully_shard
        tied = model.config.tie_embeddings  # a tied embedding is the head too: it stays the root's
        for unit in ([] if tied else [model.transformer.wte]) + list(model.transformer.h):
            fully_shard(unit)
        fully_shard(model)
    setup = model.setup_adamw if optimizer == "adamw" else model.setup_optimizers
    return setup(**optimizer_settings, zero=zero)


@contextlib.contextmanager
def unsharded(model):
    """The model's whole weights on every rank for a while, so that ranks may run different forward passes (each
    its own generations, or rank 0 alone its samples) without the all-gathers of --zero=3, at the memory of one
    whole model; a no-op at the other levels. Every rank must enter it."""
    if not is_dtensor(next(model.parameters())):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)  # fully_shard's defaults: the blocks reshard, the root keeps its own
        model.set_reshard_after_forward(False, recurse=False)
        for unit in units:
            unit.reshard()


def optimizer_state_bytes(optimizers):
    """Bytes of optimiser state this rank holds (its share from --zero=1 on)."""
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value = value.to_local() if is_dtensor(value) else value  # a slice: --zero=3
                    total += value.numel() * value.element_size()
    return total


def derive_seed(seed, purpose, step=0, rank=0):
    """The one seed rule: the seed of one random stream (what it is for, at which step, on which rank), a hash of
    them and the run's seed. Streams never share a seed, and each is the same after a resume."""
    digest = hashlib.sha256(f"{seed}/{purpose}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: random.Random and torch.Generator both take it


def scale_lr(optimizers, factor):
    """Scale the learning rates a schedule starts from (fine-tuning stages train at lr_scale times the defaults)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["initial_lr"] * factor


def stage_optimizers(model, zero, optimizer, lr, lr_scale, weight_decay, open_model):
    """A fine-tuning stage's data parallelism (`parallelize` at --zero) and optimisers. optimizer "muon":
    model.setup_optimizers (AdamW + Muon) at lr_scale x its from-scratch rates; "adamw": model.setup_adamw at lr on
    every weight; "": adamw for an open model (or a checkpoint trained from one), else muon."""
    kind = optimizer or ("adamw" if open_model else "muon")
    if kind not in ("muon", "adamw"):
        raise SystemExit(f"error: --optimizer must be muon or adamw (or empty: automatic), got {optimizer!r}")
    if kind == "adamw":
        print0(f"optimizer: AdamW at lr {lr:g}")
        return parallelize(model, zero, "adamw", lr=lr, weight_decay=weight_decay)
    optimizers = parallelize(model, zero, weight_decay=weight_decay)
    scale_lr(optimizers, lr_scale)
    print0(f"optimizer: AdamW on the LoRA adapters at {lr_scale:g} x model.LORA_LR" if model.lora is not None else
           f"optimizer: AdamW + Muon at {lr_scale:g} x the from-scratch learning rates")
    return optimizers


def set_lr(optimizers, multiplier):
    """One step of a schedule: every param group's lr is its initial_lr times the multiplier."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def setup_lora(model, rank, alpha, dropout, targets, quantize, merge, base, seed):
    """A fine-tuning stage's LoRA (model.py's add_lora) when rank > 0; QLoRA with quantize (int8|int4: the frozen
    base stored so). base: the checkpoint the adapters apply to ({"stage", "model_tag", "step"}). Returns what the
    stage adds to its checkpoints' meta: {"lora": settings and base} (save_stage then saves the adapters alone,
    load_model merges them into that base), {} without LoRA."""
    if rank == 0:
        if quantize or merge:
            raise SystemExit("error: --quantize (QLoRA) and --lora_merge need --lora_rank > 0")
        return {}
    total = model.num_params()
    try:
        config = add_lora(model, rank, alpha, dropout, targets, quantize, seed=seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"LoRA rank {rank} on {config.targets}" + (f" over an {quantize} base (QLoRA)" if quantize else "") +
           f": {trained:,} trained parameters ({trained / total * 100:.2f}% of the base's {total:,})")
    return {"lora": {**asdict(config), "base": base}}


def largest_grad(model):
    """The largest gradient entry in absolute value, a 0-dim tensor on the gradients' device (no host sync):
    inf or nan when any entry is. The max norm cannot overflow as a sum of squares of large gradients would. From
    --zero=2 on, of this rank's share of the gradients: summed over ranks (all_sum) it is still finite only when
    every entry is."""
    return largest_entry(p.grad for p in model.parameters() if p.grad is not None)


def largest_entry(tensors):
    """The largest entry in absolute value of tensors (their local slices at --zero=3), a 0-dim tensor."""
    return torch.nn.utils.get_total_norm([t.to_local() if is_dtensor(t) else t for t in tensors], float("inf"))


def check_finite(step, totals, settings):
    """Stop a diverged run. totals: the step's numbers after all_sum (e.g. {"loss": ..., "gradient":
    largest_grad}): a sum is inf or nan when any rank's is, so every rank stops at the same step. A run that
    went on would save a NaN model, and pruning would delete the good checkpoints before it. settings: the
    stage's learning-rate settings, to name in the error."""
    bad = [f"the {name} is {value}" for name, value in totals.items() if not math.isfinite(value)]
    if bad:
        raise SystemExit(f"error: step {step}: the run diverged ({', '.join(bad)}); nothing was saved. Try lower "
                         f"learning rates ({settings}) or --dtype=float32, then --resume=1 continues from the last "
                         f"checkpoint")


def check_model_fits(model_config, device):
    """Refuse a model too large for the device before allocating it (GPT(...) would fail deep in torch, or the
    machine would swap)."""
    num_params = param_floor(model_config)
    needed = 12 * num_params  # fp32 weights, their gradients and at least one optimiser state
    device = torch.device(device)
    if device.type == "cuda":
        memory, where = torch.cuda.get_device_properties(device).total_memory, f"{device} has"
    else:
        memory, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    if needed > memory:
        raise SystemExit(f"error: the model has at least {num_params:.3g} parameters (n_layer={model_config.n_layer}, "
                         f"n_embd={model_config.n_embd}): training it needs at least {needed / 2**30:,.0f} GiB and "
                         f"{where} {memory / 2**30:,.0f} GiB; choose a smaller --depth")
    return num_params


def save_stage(ckpt_dir, step, model, optimizers, rank, meta, rank_state=None):
    """A stage's checkpoint at `step`: the model (its adapters alone when meta has "lora": setup_lora) and the
    optimiser states whole, as one process holds them (gathered onto rank 0 at every --zero level, so that a run
    resumes at any level on any number of ranks); each rank's
    rank_state (e.g. its data position); the meta: the step, the model config, the world size and each rank's
    optimiser-state bytes, then `meta`. Every rank must call it. Weights that are not finite are never saved
    (the ranks agree: at --zero=3 each holds other slices)."""
    device = next(model.parameters()).device
    if not math.isfinite(all_sum({"largest": largest_entry(model.parameters())}, device)["largest"]):
        raise SystemExit(f"error: step {step}: the model's weights are not finite (the run diverged); nothing was "
                         f"saved. Try lower learning rates")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if "lora" in meta:
        model_state = lora_state_dict(model)  # the adapters alone, a small file (gathered whole at --zero=3)
    elif is_dtensor(next(model.parameters())):  # --zero=3: torch's engine gathers the slices onto rank 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        model_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        model_state = model.state_dict()
    optimizer_states = [opt.full_state_dict() for opt in optimizers]
    held = optimizer_state_bytes(optimizers)
    held = all_sum({r: held if r == rank else 0 for r in range(world_size)}, device)
    meta = {"step": step, "model_config": asdict(model.config), "world_size": world_size,
            "optimizer_state_bytes": [int(held[r]) for r in range(world_size)], **meta}
    state = {**(rank_state or {}), **({"optimizers": optimizer_states} if rank == 0 else {})}
    save_checkpoint(ckpt_dir, step, model_state, state, meta, rank)
    print0(f"saved checkpoint step {step} to {ckpt_dir}")


def finish_stage(name, section, rank):
    """A stage's end: its report section (written by rank 0) for the report card, then the process group goes."""
    if rank == 0:
        print0(f"report section: {write_report_section(name, section)}")
    teardown()


# -----------------------------------------------------------------------------
# Report sections: each stage leaves a JSON of its config, time and metrics; evaluate.py --report=1
# assembles them into report.md, with the pieces below (the environment, tables and charts).


def write_report_section(name, section):
    path = os.path.join(get_base_dir(), "report", f"{name}.json")
    atomic_write_text(path, json.dumps(section, indent=2, default=str))
    return path


def read_report_sections(report_dir):
    """The JSON sections ({name: dict}) and the stages' wall seconds ({name: float}) in report_dir."""
    sections, seconds = {}, {}
    for path in sorted(glob.glob(os.path.join(report_dir, "*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                sections[os.path.basename(path)[:-5]] = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read the report section {path} ({e}); rerun its stage or delete it")
    for path in sorted(glob.glob(os.path.join(report_dir, "*.seconds"))):
        try:
            with open(path) as f:
                seconds[os.path.basename(path)[:-8]] = float(f.read())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {path} ({e}): it should hold a number of seconds")
    return sections, seconds


def cpu_name():
    """The CPU's model name, core count and bf16 instruction sets (AMX, AVX512-BF16), for every figure a benchmark
    prints: a virtual machine's "Intel(R) Xeon(R) Processor" says nothing of how fast its bf16 is."""
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    except OSError:
        pass
    extensions = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return f"{cpu}, {os.cpu_count()} cores" + "".join(f", {name}" for name in extensions)


def environment():
    """Hardware and software versions of this machine, as markdown lines; anything unknown is left out."""
    lines = [f"- CPU: {cpu_name()}"]
    try:
        lines[0] += f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):  # sysconf names differ by platform
        pass
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"- GPU: {len(names)} x {names[0]}")
    else:
        lines.append("- GPU: none")
    commit = "unknown"
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                           capture_output=True, text=True, timeout=10)
        commit = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else commit
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        pass
    lines.append(f"- Python {platform.python_version()}, torch {torch.__version__}, picochat commit {commit}")
    return lines


def markdown_table(corner, columns, rows, cells):
    """A markdown table: corner names the column of row names; cells(row, column) -> str."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + row + " | " + " | ".join(cells(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def svg_chart(series, title, xlabel="step", width=480, height=260):
    """A small line chart as inline SVG text (the report card's charts; no plotting dependency).
    series: {name: [(x, y), ...]}; points with y None are skipped."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    points = {name: [(float(x), float(y)) for x, y in pts if y is not None and math.isfinite(y)]
              for name, pts in series.items()}
    allp = [p for pts in points.values() for p in pts]
    if not allp:
        return f"<p><em>{title}: no data</em></p>"
    x0, x1 = min(p[0] for p in allp), max(p[0] for p in allp)
    y0, y1 = min(p[1] for p in allp), max(p[1] for p in allp)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 50, 10, 24, 36
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">{title}</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>']
    for v in (y0, (y0 + y1) / 2, y1):
        out.append(f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for v in (x0, x1):
        out.append(f'<text x="{sx(v):.1f}" y="{height - bottom + 14}" text-anchor="middle">{v:.0f}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">{xlabel}</text>')
    for i, (name, pts) in enumerate(points.items()):
        color = colors[i % len(colors)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        if len(pts) == 1:
            out.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        out.append(f'<text x="{width - right - 4}" y="{top + 12 + 13 * i}" text-anchor="end" fill="{color}">{name}</text>')
    out.append("</svg>")
    return "".join(out)
