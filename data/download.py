"""
The one download helper of data/: every script that fetches a real dataset goes through here.

    from data.download import download, download_many, hf_parquet_files, iter_parquet

download(url, path) retries with exponential backoff, resumes an interrupted file through an HTTP Range request
into `path + ".part"` (or restarts it cleanly when the server ignores Range), checks the size against
Content-Length (and a known size / sha256 when given), and only then renames the file into place, so a truncated
file is never trusted by a later run. It prints one line per finished file.

hf_parquet_files() asks the HuggingFace datasets-server for the parquet files of a dataset's split;
iter_parquet() reads them row group by row group. pyarrow is needed only for those, and imported lazily.

Where from: the hub is $HF_ENDPOINT (the variable the Hugging Face tools read; default https://huggingface.co) and
the datasets-server is $HF_DATASETS_SERVER (default https://datasets-server.huggingface.co), so a mirror, or the
tests' loopback hub (tests/loopback_hub.py), serves every download without a change to the code.
download_hf_model() fetches an open model's files (config, tokenizer, safetensors) from $HF_ENDPOINT.
"""
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import requests

import common

HF_ENDPOINT = "https://huggingface.co"  # defaults; $HF_ENDPOINT and $HF_DATASETS_SERVER replace them
HF_DATASETS_SERVER = "https://datasets-server.huggingface.co"
RETRIES = 5
BACKOFF = 1.0  # seconds before the first retry; doubled on each further one
TIMEOUT = 30   # seconds without a byte before a request counts as failed
CHUNK = 1 << 20


class PermanentError(RuntimeError):
    """A failure that no retry can fix (404, size or checksum differs from the one promised)."""


# -----------------------------------------------------------------------------
# Retries


def with_retries(what, fn):
    """fn() until it returns; network errors and short reads are retried (RETRIES tries, exponential backoff)."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except (requests.RequestException, OSError) as e:
            if attempt == RETRIES - 1:
                raise RuntimeError(f"{what}: giving up after {RETRIES} tries: {e}") from e
            wait = BACKOFF * 2 ** attempt
            print(f"{what}: {e}; retrying in {wait:.1f}s", flush=True)
            time.sleep(wait)


def check_status(r, url):
    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
        raise PermanentError(f"{url}: HTTP {r.status_code}")
    r.raise_for_status()  # 5xx and throttling are retried


# -----------------------------------------------------------------------------
# One file


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch_part(url, part, size):
    """Bring `part` to the whole file: resume from its current length, or restart when the server ignores Range."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and have > size:
        os.remove(part)  # longer than the file can be: not a prefix of it
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
        if r.status_code == 416:  # nothing left to send: the part is whole (checked below) or wrong (removed)
            total = r.headers.get("Content-Range", "").rpartition("/")[2]  # "bytes */12345"
            if total == str(have):
                return have
            os.remove(part)
            raise OSError(f"server refused range {have}- (size {total}); restarting")
        check_status(r, url)
        if r.status_code == 206:
            start = int(r.headers["Content-Range"].split()[1].split("-")[0])
            if start != have:
                os.remove(part)
                raise OSError(f"server resumed at byte {start}, not {have}; restarting")
        else:
            have = 0  # a 200 is the whole file: start the part over
        length = r.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        if size is not None and total is not None and total != size:
            raise PermanentError(f"{url}: server sends {total} bytes, expected {size}")
        with open(part, "ab" if have else "wb") as f:
            for block in r.iter_content(CHUNK):
                f.write(block)
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise OSError(f"connection cut after {got} of {total} bytes")
    return got


def download(url, path, size=None, sha256=None):
    """Download url to path (atomically) unless the file is already there; returns path."""
    if os.path.exists(path):
        if size is None or os.path.getsize(path) == size:
            return path  # only ever renamed into place whole
        os.remove(path)  # another version of the file (a listing's size differs, e.g. a redone conversion)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    name = os.path.basename(path)
    got = with_retries(name, lambda: fetch_part(url, part, size))
    if size is not None and got != size:
        os.remove(part)
        raise PermanentError(f"{url}: got {got} bytes, expected {size}")
    if sha256 is not None and sha256_of(part) != sha256:
        os.remove(part)
        raise PermanentError(f"{url}: sha256 differs from the one expected")
    os.replace(part, path)
    print(f"{name}: {got / 1e6:.1f} MB", flush=True)
    return path


def download_many(jobs, workers=8):
    """Download [(url, path, size or None), ...] in parallel threads; raises after all ran if any failed."""
    def one(job):
        try:
            return download(*job)
        except (RuntimeError, OSError) as e:
            return e
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, jobs))
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} downloads failed; rerun to resume. First: {errors[0]}")
    return results


# -----------------------------------------------------------------------------
# HuggingFace datasets as parquet, and reading parquet


def hub_url(path=""):
    """An address on the hub: $HF_ENDPOINT (or huggingface.co) + path."""
    return os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/") + path


def hf_file_url(repo, path, revision="main"):
    """The download address of one file of a dataset repository (the hub redirects it to its CDN)."""
    return hub_url(f"/datasets/{repo}/resolve/{revision}/{path}")


def hf_parquet_files(dataset, config, split, allow_partial=False):
    """[(url, filename, size)] of one split, as listed by the datasets-server's /parquet endpoint.

    A config bigger than the converter's limit (~5 GB a split) is converted only in part: the listing says
    "partial": true and every split's files lie under "partial-<split>/", without saying which split was cut short.
    Such a prefix is fine to train on (allow_partial) but may not be the whole split, so as a test set it is
    refused."""
    url = os.environ.get("HF_DATASETS_SERVER", HF_DATASETS_SERVER).rstrip("/") + "/parquet"

    def listing():
        r = requests.get(url, params={"dataset": dataset, "config": config}, timeout=TIMEOUT)
        check_status(r, url)
        return r.json()
    answer = with_retries(f"{dataset} listing", listing)
    files = [f for f in answer["parquet_files"] if f["config"] == config and f["split"] == split]
    if not files:
        raise PermanentError(f"{dataset}: no parquet files for config {config!r}, split {split!r}")
    # the datasets-server names files on huggingface.co whatever hub it serves; fetch them from ours
    urls = [f["url"].replace(HF_ENDPOINT, hub_url(), 1) if f["url"].startswith(HF_ENDPOINT + "/") else f["url"]
            for f in files]
    if answer.get("partial") or any(f"/partial-{split}/" in u for u in urls):
        if not allow_partial:
            raise PermanentError(f"{dataset} {config}/{split}: only part of the split is converted to parquet "
                                 f"(a partial listing); refusing it as a whole split")
        print(f"{dataset} {config}/{split}: only part of the split is converted to parquet; using that part",
              flush=True)
    order = sorted(range(len(files)), key=lambda i: files[i]["filename"])
    return [(urls[i], files[i]["filename"], files[i].get("size")) for i in order]


def download_hf_split(dataset, config, split, directory, allow_partial=False):
    """Download one split's parquet files into directory/<config>/<split>/; returns their paths."""
    target = os.path.join(directory, config, split)
    return download_many([(url, os.path.join(target, name), size)
                          for url, name, size in hf_parquet_files(dataset, config, split, allow_partial)])


def iter_parquet(path, columns=None):
    """Yield the rows of a parquet file as dicts, one row group at a time (memory stays small)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's errors on a file that is not parquet, or a truncated one
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    missing = sorted(set(columns or ()) - set(pf.schema_arrow.names))
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (its columns: {', '.join(pf.schema_arrow.names)})")
    for i in range(pf.num_row_groups):
        yield from pf.read_row_group(i, columns=columns).to_pylist()


def write_split(name, split, rows, source):
    """$PICOCHAT_DIR/data/<name>/<split>.jsonl from normalised rows (None rows dropped); source names them in errors."""
    import data
    rows = [r for r in rows if r is not None]
    if not rows:
        raise RuntimeError(f"{source}: no usable rows")
    data.write_jsonl(os.path.join(data.data_dir(name), f"{split}.jsonl"), rows)
    print(f"{name}/{split}.jsonl: {len(rows)} rows", flush=True)


def convert_hf(name, dataset, config, splits, normalise):
    """Download the splits {our split: their split} of a HF dataset and write $PICOCHAT_DIR/data/<name>/<split>.jsonl
    with normalise(row) for each row (rows it maps to None are dropped). The parquet files stay in <name>/raw/.
    Our "test" split must be a whole split; the others may be a partial conversion (see hf_parquet_files)."""
    import data
    raw = os.path.join(data.data_dir(name), "raw")
    for ours, theirs in splits.items():
        paths = download_hf_split(dataset, config, theirs, raw, allow_partial=ours != "test")
        write_split(name, ours, [normalise(r) for path in paths for r in iter_parquet(path)],
                    f"{dataset} {config}/{theirs}")


# -----------------------------------------------------------------------------
# Open models: the files of a Hugging Face model repository (what GPT.from_pretrained and load_tokenizer read)

HF_MODEL_FILES = ["config.json", "tokenizer.json"]
# the chat template (in tokenizer_config.json, or on its own), sampling defaults: for other tools, picochat renders
# chats in code (tokenizer.py's chat formats)
HF_OPTIONAL_FILES = ["tokenizer_config.json", "chat_template.jinja", "generation_config.json"]


def hf_file_exists(url):
    """Whether the hub has the file (HEAD: 404 means no; other failures are retried, then raised)."""
    def probe():
        r = requests.head(url, allow_redirects=True, timeout=TIMEOUT)
        if r.status_code == 404:
            return False
        check_status(r, url)
        return True
    return with_retries(url.rpartition("/")[2], probe)


def download_hf_model(repo, revision="main"):
    """Download config.json, the tokenizer files and the safetensors weights (one model.safetensors, or the shards
    its model.safetensors.index.json names) of a Hugging Face model repository from $HF_ENDPOINT (default the public
    hub) into common.hf_model_dir(repo), each file with download()'s retries, resume and atomic rename. Returns the
    folder."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ValueError(f"a Hugging Face model is named <org>/<name>, got {repo!r}")
    url = lambda name: hub_url(f"/{repo}/resolve/{revision}/{name}")  # noqa: E731
    directory = common.hf_model_dir(repo)
    names = HF_MODEL_FILES + [name for name in HF_OPTIONAL_FILES if hf_file_exists(url(name))]
    index = "model.safetensors.index.json"
    if hf_file_exists(url(index)):
        download(url(index), os.path.join(directory, index))
        with open(os.path.join(directory, index), encoding="utf-8") as f:
            names += sorted(set(json.load(f)["weight_map"].values()))
    else:
        names.append("model.safetensors")
    download_many([(url(name), os.path.join(directory, name), None) for name in names], workers=4)
    return directory
