"""Looking at a preprocess output directory: what ``seqpack stats`` (counts, fill, length percentiles,
a plot) and ``seqpack inspect`` (packed rows decoded, with their segment boundaries) print; the
commands themselves are in ``cli.py``.

Both read ``manifest.json``; ``inspect`` also opens the first shards. Nothing here writes shards.
The output may be a local directory or a URL (``s3://bucket/prefix``, any fsspec protocol): a URL's
manifest and shards are read through :mod:`seqpack.sources.remote`, which retries transient errors.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from seqpack.lazy import import_pyplot
from seqpack.shards.format import MANIFEST, ShardFile, read_manifest, shard_entries
from seqpack.shards.verify import ShardError, shard_location, verify_shard
from seqpack.sources import remote
from seqpack.sources.records import SourceError, split_doc_id
from seqpack.sources.tokenize import load_tokenizer
from seqpack.sources.urls import basename, is_url

# what `seqpack stats` / `inspect` report as an error (exit 2) rather than a traceback, each naming its
# cause: a bad output (ShardError), a URL denied or still failing after the remote layer's retries
# (SourceError), a missing optional extra (ImportError: the 'remote' backends, the 'plot' extra)
COMMAND_ERRORS: tuple[type[Exception], ...] = (ShardError, SourceError, ImportError)

STAT_KEYS = (
    "documents",
    "tokens_in",
    "tokens_out",
    "dropped_tokens",
    "truncated_tokens",
    "dropped_docs",
    "truncated_docs",
    "skipped_records",
    "skipped_files",
    "empty_documents",
    "rows",
    "segments",
    "shards",
)


def shard_stats(directory: str) -> dict:
    """Summary of a preprocess output directory (from its manifest).

    Keys: ``documents``, ``tokens_in``, ``tokens_out``, ``dropped_tokens``, ``truncated_tokens``
    (and the doc counts behind them), ``lost_tokens`` (dropped + truncated), ``fill`` (tokens out /
    row capacity; rows of ``pack``/``none`` hold ``capacity`` tokens), ``rows``, ``segments``, ``shards``,
    ``doc_length`` / ``row_length`` percentiles (tokens), ``strategy``, ``capacity``, ``tokenizer``.
    ``target_tokens``: tokens that are loss targets after the shift (loss-masked tokens but each
    segment's first), None for outputs written before seqpack counted them.
    ``seq_len`` repeats ``capacity`` for one release, for scripts that read the old key.
    """
    man = read_output(directory)
    t = man["totals"]
    out = {k: int(t.get(k, 0)) for k in STAT_KEYS}
    # loss targets after the shift; outputs written before they were counted say None (unknown)
    out["target_tokens"] = None if t.get("target_tokens") is None else int(t["target_tokens"])
    out["lost_tokens"] = out["dropped_tokens"] + out["truncated_tokens"]
    out["fill"] = float(t.get("fill", 0.0))
    out["doc_length"] = dict(man["doc_length_percentiles"])
    out["row_length"] = dict(man["row_length_percentiles"])
    cfg = man["config"]
    out.update(
        strategy=cfg["strategy"],
        capacity=cfg["capacity"],
        seq_len=cfg["capacity"],  # deprecated name of capacity, kept one release for JSON readers
        algorithm=cfg["algorithm"],
        format=cfg["format"],
        tokenizer=man["tokenizer"]["name"],
        directory=_display(directory),
    )
    return out


def _display(directory: str) -> str:
    """How reports name an output: a local path made absolute, a URL without its trailing ``/``."""
    return directory.rstrip("/") if is_url(directory) else os.path.abspath(directory)


def read_output(directory: str) -> dict:
    """The manifest of a preprocess output directory or URL; :class:`ShardError` says what
    ``directory`` is instead: missing, a file, an unfinished run, or not a preprocess output at all.
    A URL's other failures (access denied, retries exhausted) raise the remote layer's
    :class:`~seqpack.sources.records.SourceError`, naming the URL."""
    if is_url(directory):
        return _read_url_output(directory)
    if not os.path.exists(directory):
        raise ShardError(f"{directory}: the directory does not exist")
    if not os.path.isdir(directory):
        raise ShardError(f"{directory}: a file, not a preprocess output directory")
    if not os.path.isfile(os.path.join(directory, "manifest.json")):
        if os.path.isdir(os.path.join(directory, ".seqpack")):  # the work dir of seqpack.preprocess
            raise ShardError(
                f"{directory}: an unfinished preprocess run (no manifest.json yet); rerun the same "
                "`seqpack preprocess` command to finish it"
            )
        raise ShardError(
            f"{directory}: not a seqpack preprocess output (no manifest.json); give the --output "
            "directory of `seqpack preprocess`"
        )
    return read_manifest(directory)


def _read_url_output(url: str) -> dict:
    url = url.rstrip("/")
    try:  # asked again (fresh): a manifest pushed since this process last looked is seen
        remote.info(f"{url}/{MANIFEST}", fresh=True)
    except SourceError as e:
        if "(404)" not in e.problem:
            raise
        raise ShardError(_missing_manifest(url)) from None
    return read_manifest(url)


def _missing_manifest(url: str) -> str:
    """Why ``url`` has no manifest: nothing there, an object rather than a prefix, an unfinished run
    (a URL output's work directory ``.seqpack/`` is mirrored before its manifest), or something else.
    Only asked on this error path, so a good output costs no listing."""
    fs, path = remote.filesystem(url)
    fs.invalidate_cache(path)  # a listing cached by this process may predate the output
    try:
        found = remote.call(url, "looking it up", lambda: fs.info(path))
    except SourceError as e:
        if "(404)" not in e.problem:
            raise
        return (
            f"{url}: nothing at this URL: not a seqpack preprocess output (no {MANIFEST}); give the "
            "--output URL of `seqpack preprocess`"
        )
    if found.get("type") != "directory":
        return f"{url}: an object (a file), not a preprocess output directory (no {MANIFEST} under it)"
    names = remote.call(url, "listing it", lambda: fs.ls(path, detail=False))
    if any(basename(str(n)) == ".seqpack" for n in names):
        return (
            f"{url}: an unfinished preprocess run (no {MANIFEST} yet); rerun the same "
            "`seqpack preprocess` command to finish it"
        )
    return (
        f"{url}: not a seqpack preprocess output, or an unfinished one (no {MANIFEST}); give the "
        "--output URL of `seqpack preprocess`"
    )


def _target_line(st: dict) -> str:
    t = st["target_tokens"]
    if t is None:
        return "  target tokens             unknown   (output written before seqpack counted them)"
    return (
        f"  target tokens     {t:>14,}   ({t / max(st['tokens_out'], 1):.2%} of tokens out: a segment's "
        "first token and loss-masked tokens are not targets)"
    )


def verify_shards(directory: str) -> list[str]:
    """Names of the manifest's shards that are missing or whose size/sha256 no longer match (a
    local directory or a URL; a URL's shards are hashed as they stream, never held whole)."""
    man = read_output(directory)
    check = _url_shard_ok if is_url(directory) else verify_shard
    return [s["name"] for s in man["shards"] if not check(directory, s)]


def _url_shard_ok(url: str, entry: dict) -> bool:
    """:func:`~seqpack.shards.verify.verify_shard` for a URL output: the object exists with the size
    and sha256 of its entry. A missing object (404) is a bad shard, as a missing file is; access
    denied and exhausted retries raise :class:`SourceError` (the shard's state is unknown)."""
    shard = shard_location(url.rstrip("/"), entry["name"])
    h = hashlib.sha256()
    try:
        with remote.open_input(shard) as f:  # asks the size and version again: a replaced object is seen
            if f.size != int(entry["bytes"]):
                return False
            while chunk := f.read(4 << 20):
                h.update(chunk)
    except SourceError as e:
        if "(404)" in e.problem:
            return False
        raise
    return h.hexdigest() == entry["sha256"]


def plot_stats(directory: str, out_png: str) -> str:
    """Write a PNG: document-length histogram (log x) and the distribution of per-row fill."""
    plt = import_pyplot()  # the optional 'plot' extra; a clear ImportError without it
    man = read_output(directory)
    st = shard_stats(directory)
    h = man["histograms"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    edges, counts = np.asarray(h["doc_length"]["edges"], float), np.asarray(h["doc_length"]["counts"])
    a.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4878a8", edgecolor="white", lw=0.3)
    a.set_xscale("log", base=2)
    nz = np.flatnonzero(counts)
    if len(nz):  # the histogram edges start at 1 token; show the populated range (and the capacity)
        a.set_xlim(min(edges[nz[0]], st["capacity"]) / 1.5, max(edges[nz[-1] + 1], st["capacity"]) * 1.5)
    a.axvline(st["capacity"], color="#c44e52", ls="--", lw=1, label=f"capacity {st['capacity']}")
    p = st["doc_length"]
    a.set_title(f"document lengths ({st['documents']:,} docs; p50 {p['p50']:,}, p99 {p['p99']:,} tokens)")
    a.set_xlabel("tokens per document")
    a.set_ylabel("documents")
    a.legend()
    edges, counts = np.asarray(h["row_fill"]["edges"]), np.asarray(h["row_fill"]["counts"])
    b.bar(
        edges[:-1] * 100,
        counts,
        width=np.diff(edges) * 100,
        align="edge",
        color="#55a868",
        edgecolor="white",
        lw=0.3,
    )
    b.set_title(f"per-row fill ({st['rows']:,} rows, {st['strategy']}; overall {st['fill']:.2%})")
    b.set_xlabel("fill of row (%)")
    b.set_ylabel("rows")
    b.set_yscale("log")
    fig.suptitle(
        f"{basename(st['directory'])}: {st['tokens_in']:,} tokens in, {st['tokens_out']:,} out, "
        f"{st['lost_tokens']:,} lost"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return os.path.abspath(out_png)


def format_stats(st: dict) -> str:
    """Human-readable lines for :func:`shard_stats`."""
    d, r = st["doc_length"], st["row_length"]
    tin = max(st["tokens_in"], 1)
    return "\n".join(
        [
            f"{st['directory']}: strategy {st['strategy']} ({st['algorithm']}), capacity {st['capacity']}, "
            f"{st['format']}, tokenizer {st['tokenizer']}",
            f"  documents         {st['documents']:>14,}   (skipped records {st['skipped_records']:,}, "
            f"empty {st['empty_documents']:,})",
            f"  skipped files     {st['skipped_files']:>14,}   (unreadable inputs or the unread rest of one "
            "under on_error: skip)",
            f"  tokens in         {st['tokens_in']:>14,}",
            f"  tokens out        {st['tokens_out']:>14,}   ({st['tokens_out'] / tin:.2%} of input)",
            _target_line(st),
            f"  dropped tokens    {st['dropped_tokens']:>14,}   ({st['dropped_docs']:,} docs)",
            f"  truncated tokens  {st['truncated_tokens']:>14,}   ({st['truncated_docs']:,} docs)",
            f"  rows              {st['rows']:>14,}   in {st['shards']:,} shards, "
            f"{st['segments']:,} segments",
            f"  fill              {st['fill']:>14.2%}",
            f"  doc length        p50 {d['p50']:,}  p90 {d['p90']:,}  p99 {d['p99']:,}  max {d['max']:,}  "
            f"mean {d['mean']:,.1f}",
            f"  row length        p50 {r['p50']:,}  p90 {r['p90']:,}  p99 {r['p99']:,}  max {r['max']:,}",
        ]
    )


INSPECT_LEGEND = (
    "columns: [start:end) tokens of the row | doc source/shard/record | @offset of the piece in its "
    "document | targets: loss targets after the shift / tokens | text"
)


def inspect_rows(directory: str, n: int = 3, *, width: int = 72, verify: bool = False) -> str:
    """A legend line, then the first ``n`` rows, one line per segment: token range, document,
    offset, targets, text. Columns are as wide as their largest value, so they stay aligned.

    Targets are counted as a batch counts them: loss-masked tokens after each segment's first one,
    whose label is -100 because nothing before it in the segment can predict it. Shards are
    checked as the loader checks them (size, page checksums; ``verify``: sha256 too).
    """
    man = read_output(directory)
    decode = _decoder(man)
    cap = man["config"]["capacity"]
    headers: list[str] = []
    segments: list[list[tuple]] = []
    for path, entry in shard_entries(directory, man):
        if is_url(path):  # the size this process may have cached could predate a replaced object
            remote.info(path, fresh=True)
        for row in ShardFile(path, entry, verify=verify).rows():
            if len(headers) >= n:
                break
            headers.append(
                f"row {len(headers)} ({basename(path)}): {len(row):,} tokens, {row.n_segments} "
                f"segments, fill {len(row) / cap:.1%} of {cap}"
            )
            cu = row.cu_seqlens
            segs = []
            for i, (doc_id, start, toks, mask) in enumerate(row.segments()):
                src, shard, rec = split_doc_id(doc_id)
                text = decode(toks)
                text = repr(text if len(text) <= width else text[: width - 3] + "...")
                segs.append(
                    (
                        int(cu[i]),
                        int(cu[i + 1]),
                        f"{src}/{shard}/{rec}",
                        int(start),
                        int(mask[1:].sum()),
                        len(toks),
                        text,
                    )
                )
            segments.append(segs)
        if len(headers) >= n:
            break
    lines = [INSPECT_LEGEND] if headers else []
    for header, segs in zip(headers, segment_lines(segments)):
        lines += [header, *segs]
    return "\n".join(lines)


def segment_lines(rows: list[list[tuple]]) -> list[list[str]]:
    """Format ``(start, end, doc, offset, targets, tokens, text)`` segments of several rows with
    every column as wide as its widest value over all of them (aligned past offsets of 1M)."""
    flat = [s for segs in rows for s in segs]
    if not flat:
        return [[] for _ in rows]
    w = [max(len(str(s[k])) for s in flat) for k in range(6)]
    w[0] = w[1] = max(w[0], w[1])
    return [
        [
            f"  [{a:>{w[0]}}:{b:>{w[1]}})  doc {doc:<{w[2]}} @{off:<{w[3]}} "
            f"targets {t:>{w[4]}}/{ln:<{w[5]}} {text}"
            for a, b, doc, off, t, ln, text in segs
        ]
        for segs in rows
    ]


def _decoder(man: dict):
    name = man["tokenizer"]["name"]
    try:
        tok = load_tokenizer(name) if name == "byte" or os.path.exists(name) else None
    except (ValueError, OSError):
        tok = None
    if tok is None:
        return lambda ids: " ".join(str(int(i)) for i in ids[:32])
    return lambda ids: tok.decode(np.asarray(ids, np.int64))
