"""A loopback Hugging Face hub for tests: three HTTP servers on 127.0.0.1 that answer the requests data/*.py make,
the way the real services answer them.

    hub = Hub()                      # or the `hub` fixture of conftest.py, which also sets the environment:
    HF_ENDPOINT=hub.endpoint HF_DATASETS_SERVER=hub.datasets_server python data/gsm8k.py

- the hub (HF_ENDPOINT): GET /datasets/<repo>/resolve/<revision>/<path>. A file stored in LFS/Xet (parquet
  shards) answers 302 to the CDN, as huggingface.co does; a small text file answers 200 itself. An unknown file
  is a 404. The revision may be percent-encoded: the parquet conversion lives on "refs%2Fconvert%2Fparquet".
- the CDN (where the hub redirects): GET /<sha256>?<signature> with the file's bytes, Content-Length and Range.
- the datasets-server (HF_DATASETS_SERVER): GET /parquet?dataset=<repo>[&config=<config>], the listing JSON.
  Per file: dataset, config, split, url, filename, size, with urls on https://huggingface.co whatever hub serves
  them (as the real one writes them); per answer: "partial", plus "pending" and "failed" without a config, or
  "features" with one. A config converted in part (too big) has every split under <config>/partial-<split>/, as
  the converter does it: which split was cut short is not said.

Files are generated in the test with the real datasets' schemas (publish_* below), tiny. Hub.plan makes a file
fail the next requests for it (keyed by its path in the repository): "500" (a server error), "cut" (half the
bytes, then the connection closes) or "norange" (the whole file, ignoring Range). Hub.log records (server, path,
Range header) of every request; Hub.requests() reads it.
"""
import hashlib
import io
import json
import random
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REAL_HUB = "https://huggingface.co"
PARQUET_REVISION = "refs/convert/parquet"


class Hub:
    def __init__(self):
        self.files = {}     # (repo, revision, path) -> bytes
        self.lfs = set()    # keys of files the hub redirects to the CDN
        self.listings = {}  # dataset -> [{"config", "split", "path", "size"}] of its parquet conversion
        self.partial = set()  # (dataset, config) converted only in part
        self.cdn_keys = {}  # sha256 -> key of the files the hub has redirected to the CDN
        self.plan, self.log = {}, []
        self.servers = {name: ThreadingHTTPServer(("127.0.0.1", 0), handler)
                        for name, handler in (("hub", HubHandler), ("cdn", CdnHandler), ("ds", ListingHandler))}
        for server in self.servers.values():
            server.hub = self
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self.endpoint, self.cdn, self.datasets_server = (f"http://127.0.0.1:{self.servers[n].server_port}"
                                                         for n in ("hub", "cdn", "ds"))

    def close(self):
        for server in self.servers.values():
            server.shutdown()
            server.server_close()

    def add_file(self, repo, path, data, revision="main", lfs=None):
        """Publish a file of dataset `repo`; lfs (default: parquet files) makes the hub redirect it to the CDN."""
        key = (repo, revision, path)
        self.files[key] = data
        if lfs if lfs is not None else path.endswith(".parquet"):
            self.lfs.add(key)

    def add_split(self, dataset, config, split, rows, partial=False, shards=1):
        """The parquet conversion of one split (rows in `shards` files), listed by the datasets-server. partial: the
        config is converted in part, which goes for all of its splits."""
        if any(e["config"] == config for e in self.listings.get(dataset, [])) and \
                partial != ((dataset, config) in self.partial):
            raise ValueError(f"{dataset} {config}: a config is converted in part as a whole, or not at all")
        if partial:
            self.partial.add((dataset, config))
        folder = f"{config}/{'partial-' if partial else ''}{split}"
        for i in range(shards):
            path = f"{folder}/{i:04d}.parquet"
            data = parquet_bytes(rows[i::shards])
            self.add_file(dataset, path, data, revision=PARQUET_REVISION)
            self.listings.setdefault(dataset, []).append({"config": config, "split": split, "path": path,
                                                          "size": len(data)})

    def url(self, repo, path, revision="main"):
        return f"{self.endpoint}/datasets/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{path}"

    def requests(self, server, suffix=""):
        """(path, Range header) of the requests `server` had for paths ending with suffix, percent-decoded."""
        return [(urllib.parse.unquote(path), rng) for name, path, rng in self.log
                if name == server and urllib.parse.unquote(path).endswith(suffix)]


def parquet_bytes(rows, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# The three servers


class Handler(BaseHTTPRequestHandler):
    name = ""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.hub = self.server.hub
        self.path_only, _, self.query = self.path.partition("?")
        self.hub.log.append((self.name, self.path_only, self.headers.get("Range")))
        self.get()

    def reply(self, code, body=b"", headers=None, cut=False):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if cut else body)
        self.wfile.flush()
        self.close_connection = True

    def serve_bytes(self, key):
        """A file's bytes, with Range, failing as the plan says."""
        actions = self.hub.plan.get(key[2])
        action = actions.pop(0) if actions else "ok"
        if action == "500":
            return self.reply(500, b"Internal Error")
        body = self.hub.files[key]
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
        rng = self.headers.get("Range")
        if rng and action != "norange":
            start, _, end = rng.removeprefix("bytes=").partition("-")
            start, end = int(start), int(end) if end else len(body) - 1
            if start >= len(body):
                return self.reply(416, b"", {"Content-Range": f"bytes */{len(body)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            return self.reply(206, body[start:end + 1], headers, cut=action == "cut")
        self.reply(200, body, headers, cut=action == "cut")


class HubHandler(Handler):
    name = "hub"

    def get(self):
        parts = self.path_only.split("/")  # "", "datasets", owner, name, "resolve", revision, path...
        if len(parts) < 7 or parts[1] != "datasets" or parts[4] != "resolve":
            return self.reply(404, b"Not Found")
        key = ("/".join(parts[2:4]), urllib.parse.unquote(parts[5]), urllib.parse.unquote("/".join(parts[6:])))
        if key not in self.hub.files:
            return self.reply(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"})
        if key in self.hub.lfs:
            digest = hashlib.sha256(self.hub.files[key]).hexdigest()
            self.hub.cdn_keys[digest] = key
            return self.reply(302, b"", {"Location": f"{self.hub.cdn}/{digest}?X-Amz-Signature=loopback"})
        self.serve_bytes(key)


class CdnHandler(Handler):
    name = "cdn"

    def get(self):
        key = self.hub.cdn_keys.get(self.path_only.lstrip("/"))
        if key is None or "X-Amz-Signature" not in self.query:
            return self.reply(403, b"AccessDenied")
        self.serve_bytes(key)


class ListingHandler(Handler):
    name = "ds"

    def get(self):
        query = urllib.parse.parse_qs(self.query)
        dataset, config = query.get("dataset", [""])[0], query.get("config", [None])[0]
        entries = [e for e in self.hub.listings.get(dataset, []) if config is None or e["config"] == config]
        if self.path_only != "/parquet" or not entries:
            body = json.dumps({"error": "The dataset does not exist, or is not accessible without authentication "
                                        "(private or gated)."}).encode()
            return self.reply(404, body, {"Content-Type": "application/json", "X-Error-Code": "DatasetNotFoundError"})
        files = [{"dataset": dataset, "config": e["config"], "split": e["split"],
                  "url": f"{REAL_HUB}/datasets/{dataset}/resolve/{urllib.parse.quote(PARQUET_REVISION, safe='')}/"
                         f"{e['path']}",
                  "filename": e["path"].rsplit("/", 1)[1], "size": e["size"]} for e in entries]
        partial = any((dataset, e["config"]) in self.hub.partial for e in entries)
        answer = {"parquet_files": files, **({"features": None} if config else {"pending": [], "failed": []}),
                  "partial": partial}
        self.reply(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})


# -----------------------------------------------------------------------------
# Tiny datasets with the real schemas: what the gpu preset of speedrun.sh downloads

WORDS = ("river stone light garden window music bread winter market letter forest engine story candle bridge "
         "harbor paper silver orchard lantern").split()
VERBS = "finds carries paints follows builds remembers opens watches".split()


def sentence(rng):
    a, b = rng.sample(WORDS, 2)
    return f"The {a} {rng.choice(VERBS)} the {b} {rng.choice(['at dawn', 'in the rain', 'again', 'quietly'])}."


def document(rng):
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 12)))


def publish_corpus(hub, repo, shards, docs=150, seed=0):
    """Pretraining shards shard_XXXXX.parquet (a "text" column) of a corpus repository, with these indices."""
    for i in shards:
        rng = random.Random(f"{seed}/{i}")
        hub.add_file(repo, f"shard_{i:05d}.parquet",
                     parquet_bytes([{"text": document(rng)} for _ in range(docs)], row_group_size=50))


def word_problem(rng, i):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    question = f"Sam has {a} {WORDS[i % len(WORDS)]} cards and gets {b} more. How many cards does Sam have now?"
    return {"question": question, "answer": f"Sam has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} cards.\n#### {a + b}"}


def mc_rows(rng, n):
    """(question, four choices, index of the right one) of simple sums."""
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        choices = [str(a + b + d) for d in rng.sample([-2, -1, 1, 2, 3], 3)] + [str(a + b)]
        rng.shuffle(choices)
        out.append((f"What is {a} + {b}?", choices, choices.index(str(a + b))))
    return out


def publish_smoltalk(hub, n_train=64, n_test=8):
    """HuggingFaceTB/smol-smoltalk, config default: messages [{content, role}], source."""
    rng = random.Random("smoltalk")
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            a, b = rng.sample(WORDS, 2)
            messages = [{"content": f"Tell me about the {a}.", "role": "user"},
                        {"content": f"The {a} is close to the {b}. {sentence(rng)}", "role": "assistant"}]
            if i % 4 == 0:
                messages.insert(0, {"content": "You are a helpful assistant.", "role": "system"})
            if i % 7 == 3:
                messages.append({"content": "And then?", "role": "user"})  # ends with the user: dropped by us
            rows.append({"messages": messages, "source": "smol-magpie-ultra"})
        hub.add_split("HuggingFaceTB/smol-smoltalk", "default", split, rows)


def publish_gsm8k(hub, n_train=64, n_test=8):
    """openai/gsm8k, config main: question, answer ("...<<a+b=c>>c...\\n#### c")."""
    rng = random.Random("gsm8k")
    for split, n in (("train", n_train), ("test", n_test)):
        hub.add_split("openai/gsm8k", "main", split, [word_problem(rng, i) for i in range(n)])


def math500_rows(n=8):
    """HuggingFaceH4/MATH-500's test.jsonl: problem, solution, answer, subject, level (int), unique_id."""
    rng = random.Random("math500")
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        rows.append({"problem": f"Compute $\\frac{{{a}}}{{{b}}} + \\frac{{1}}{{{b}}}$.",
                     "solution": f"Add the numerators: $\\frac{{{a}+1}}{{{b}}} = \\boxed{{\\frac{{{a + 1}}}{{{b}}}}}$.",
                     "answer": f"\\frac{{{a + 1}}}{{{b}}}", "subject": "Prealgebra", "level": 1 + i % 5,
                     "unique_id": f"test/prealgebra/{100 + i}.json"})
    return rows


def publish_math500(hub, n=8, parquet=True):
    """The raw file on main, and (parquet) its automatic conversion, config default, split test."""
    rows = math500_rows(n)
    hub.add_file("HuggingFaceH4/MATH-500", "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    if parquet:
        hub.add_split("HuggingFaceH4/MATH-500", "default", "test", rows)
    return rows


def publish_hendrycks_math(hub, n=4):
    """EleutherAI/hendrycks_math, a config per subject, splits train and test: problem, level ("Level 3"; a few
    "Level ?"), type, solution (the answer \\boxed{} in it; a few have none). Prealgebra's test split also holds
    MATH-500's problems (math500_rows), one with its whitespace changed. Returns all the rows."""
    from data.hendrycks_math import SUBJECTS
    rng, published = random.Random("hendrycks_math"), []
    for subject in SUBJECTS:
        for split in ("train", "test"):
            rows = []
            for i in range(n):
                a, b = rng.randint(10, 99), rng.randint(10, 99)
                boxed = f"$\\boxed{{{a + b}}}$" if i != 1 else f"{a + b}"
                rows.append({"problem": f"What is ${a} + {b}$ in {subject}?", "level": f"Level {1 + i % 5}"
                             if i != 2 else "Level ?", "type": subject.replace("_", " ").title(),
                             "solution": f"We add: ${a} + {b} = {a + b}$, so the answer is {boxed}."})
            if (subject, split) == ("prealgebra", "test"):
                taken = math500_rows()
                rows += [{"problem": r["problem"].replace(" + ", "  +\n ") if i == 0 else r["problem"],
                          "level": f"Level {r['level']}", "type": "Prealgebra", "solution": r["solution"]}
                         for i, r in enumerate(taken)]
            hub.add_split("EleutherAI/hendrycks_math", subject, split, rows)
            published += rows
    return published


def publish_arc(hub, n_train=16, n_test=8):
    """allenai/ai2_arc, configs ARC-Easy and ARC-Challenge: id, question, choices {text, label}, answerKey. Labels
    are letters, on a few items digits; a few items have 3 or 5 choices."""
    for config in ("ARC-Easy", "ARC-Challenge"):
        rng = random.Random(config)
        for split, n in (("train", n_train), ("validation", 4), ("test", n_test)):
            rows = []
            for i, (question, choices, right) in enumerate(mc_rows(rng, n)):
                if i % 5 == 4:
                    choices = choices + ["none of these"]
                labels = list("1234" if i % 6 == 5 else "ABCDE")[:len(choices)]
                rows.append({"id": f"Mercury_{7000000 + i}", "question": question,
                             "choices": {"text": choices, "label": labels}, "answerKey": labels[right]})
            hub.add_split("allenai/ai2_arc", config, split, rows)


def publish_mmlu(hub, n_train=16, n_test=8):
    """cais/mmlu, config all: question, subject, choices (4), answer (int); splits auxiliary_train, test,
    validation, dev."""
    rng = random.Random("mmlu")
    for split, n in (("auxiliary_train", n_train), ("test", n_test), ("validation", 4), ("dev", 5)):
        rows = [{"question": q, "subject": "" if split == "auxiliary_train" else "elementary_mathematics",
                 "choices": choices, "answer": right} for q, choices, right in mc_rows(rng, n)]
        hub.add_split("cais/mmlu", "all", split, rows)


def publish_hellaswag(hub, n_train=16, n_val=8, n_test=8):
    """Rowan/hellaswag, config default: ind, activity_label, ctx_a, ctx_b, ctx, endings, source_id, split,
    split_type, label as a string ("" in the test split, which has no labels). Returns {split: rows}."""
    rng = random.Random("hellaswag")
    published = {}
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        rows = published[split] = []
        for i in range(n):
            a, b = rng.sample(WORDS, 2)
            endings = [f"puts the {w} away." for w in rng.sample(WORDS, 4)]
            label = rng.randrange(4)
            rows.append({"ind": 1000 + i, "activity_label": "Making a " + a, "ctx_a": f"A man holds a {a}.",
                         "ctx_b": "he", "ctx": f"A man holds a {a}. he", "endings": endings,
                         "source_id": f"activitynet~v_{b}{i}", "split": "val" if split == "validation" else split,
                         "split_type": "indomain", "label": "" if split == "test" else str(label)})
        hub.add_split("Rowan/hellaswag", "default", split, rows)
    return published


def publish_recipe(hub, corpus_repo="karpathy/climbmix-400b-shuffle", train_shards=2, val_shard=6542):
    """Everything the gpu preset downloads: corpus shards 0..train_shards-1 and the validation shard, and the chat,
    math and multiple-choice sets. Returns HellaSwag's rows {split: rows}."""
    publish_corpus(hub, corpus_repo, [*range(train_shards), val_shard])
    publish_smoltalk(hub)
    publish_gsm8k(hub)
    publish_math500(hub)
    publish_arc(hub)
    publish_mmlu(hub)
    return publish_hellaswag(hub)
