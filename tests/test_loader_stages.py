"""Length-aware stages through build_loader from YAML configs: decompose, bucket, chunkflow, mil.

For each stage: output type and invariants, token accounting (every token emitted or counted),
exact resume at random points with 0 and 2 workers (identical to the uninterrupted run), 2 ranks
with disjoint documents and equal step counts, and config errors naming the key.
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
import yaml

from seqpack import build_loader, read, tokenize
from seqpack.batch import IGNORE_INDEX, VarlenBatch
from seqpack.config import ConfigError, load_config
from seqpack.mil import MILBatch
from seqpack.stages.chunkflow import Chunk


# ------------------------------------------------------------------------------------------ data
def write_text_corpus(tmp_path, n_docs=160, seed=0, lengths=None) -> str:
    """Two .jsonl files of lowercase text (byte tokenizer: one token per character + EOS)."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = (rng.lognormal(4.3, 0.9, n_docs).astype(int) + 1).tolist()
    docs = ["".join(chr(97 + c) for c in rng.integers(0, 26, n)) for n in lengths]
    for f in range(2):
        with open(tmp_path / f"d{f}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in docs[f::2])
    return str(tmp_path / "d*.jsonl")


def write_bags(tmp_path, n=14, seed=0) -> None:
    rng = np.random.default_rng(seed)
    (tmp_path / "bags").mkdir()
    rows = ["slide_id,label"]
    for i in range(n):
        np.save(tmp_path / "bags" / f"s{i:02d}.npy", rng.standard_normal((15 + 29 * i, 4)).astype(np.float16))
        rows.append(f"s{i:02d},{'tumor' if i % 3 else 'normal'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "loader.yaml"
    path.write_text(text)
    return str(path)


STAGE_CONFIGS = {
    "decompose": """
sources: [{{path: "{glob}"}}]
stage: {{type: decompose, buffer_tokens: 2048}}
curriculum:
  tokens_per_step: 256
  decompose: {{min_log2: 3, max_log2: 6, remainder: drop}}
  buckets: {{odds: grow_p2}}
shuffle: {{seed: 3, buffer: 16}}
""",
    "bucket": """
sources: [{{path: "{glob}"}}]
stage: {{type: bucket, mode: pad, overflow: split}}
curriculum:
  boundaries: [32, 128, 512]
  tokens_per_step: 1024
  buckets: {{odds: uniform, weighting: odds_by_mass}}
shuffle: {{seed: 3, buffer: 16}}
""",
    "chunkflow": """
sources: [{{path: "{glob}"}}]
stage: {{type: chunkflow, capacity: 128, tokens_per_step: 1024}}
shuffle: {{seed: 3, buffer: 16}}
""",
    "seqlen": """
sources: [{{path: "{glob}"}}]
stage: {{type: seqlen, buffer_docs: 32}}
curriculum:
  tokens_per_step: 512
  seqlen:
    {{min_difficulty: 32, max_difficulty: 256, schedule_type: fixed_root, mode: pack,
     schedule_config: {{total_curriculum_step: 30, difficulty_step: 16, root_degree: 2}}}}
shuffle: {{seed: 3, buffer: 16}}
""",
    "mil": """
sources: [{{path: bags}}]
labels: {{path: labels.csv}}
stage: {{type: mil, capacity: 96, packs_per_batch: 1, main_fraction: 0.5, algorithm: bfd}}
shuffle: {{seed: 5}}
""",
}


def stage_config(tmp_path, stage: str, n_docs=160) -> str:
    if stage == "mil":
        write_bags(tmp_path)
        glob = ""
    else:
        glob = write_text_corpus(tmp_path, n_docs)
    return write_config(tmp_path, STAGE_CONFIGS[stage].format(glob=glob))


def expected_docs(cfg_path) -> dict[int, np.ndarray]:
    cfg = load_config(cfg_path)
    out = {}
    for i, s in enumerate(cfg["sources"]):
        for d in tokenize(read(s["path"], source_index=i), cfg["tokenizer"]):
            out[d.doc_id] = d.tokens
    return out


def segments(batch: VarlenBatch):
    """(doc_id, start, tokens) of each real segment."""
    cu = batch.cu_seqlens.numpy()
    for s in range(batch.n_real_segments):
        yield int(batch.doc_ids[s]), int(batch.seg_start[s]), batch.input_ids[cu[s] : cu[s + 1]].numpy()


def fingerprint(item) -> tuple:
    """Everything a training step sees, as comparable Python values."""
    if isinstance(item, VarlenBatch):
        return (
            item.input_ids.tolist(),
            item.labels.tolist(),
            item.cu_seqlens.tolist(),
            item.doc_ids.tolist(),
        )
    if isinstance(item, MILBatch):
        return (
            item.slide_ids.tolist(),
            item.instance_idx.tolist(),
            float(item.features.double().sum()),
            item.loss_scale,
            None if item.residual is None else item.residual.slide_ids.tolist(),
        )
    assert isinstance(item, list) and all(isinstance(c, Chunk) for c in item)
    return tuple((fingerprint(c.batch), c.shift_labels.tolist(), c.chain_id, c.chain_pos) for c in item)


def doc_ids_of(item) -> set[int]:
    if isinstance(item, VarlenBatch):
        return {d for d, _, _ in segments(item)}
    if isinstance(item, MILBatch):
        return set(item.slide_ids.tolist()) if item.loss_scale else set()
    return set().union(*(doc_ids_of(c.batch) for c in item))


# ------------------------------------------------------------------------------------------ invariants
def test_decompose_steps_and_token_accounting(tmp_path):
    path = stage_config(tmp_path, "decompose")
    want = expected_docs(path)
    loader = build_loader(path)
    batches = list(loader)
    assert batches and all(isinstance(b, VarlenBatch) for b in batches)
    for b in batches:
        b.validate()
        assert b.num_loss_tokens == 256  # every step: exactly tokens_per_step targets
        lens = {len(t) for _, _, t in segments(b)}
        assert len(lens) == 1 and (lens.pop() - 1) in (8, 16, 32, 64)  # one bucket 2^k + 1 per step
        for d, s, t in segments(b):
            np.testing.assert_array_equal(t, want[d][s : s + len(t)])
    st = loader.stats()
    total = sum(len(t) for t in want.values())
    emitted = sum(len(t) for b in batches for _, _, t in segments(b))
    assert st["decompose/input_tokens"] == total
    assert st["decompose/emitted_tokens"] == emitted
    assert total == emitted + st["decompose/dropped_tokens"] + st["decompose/leftover_tokens"]
    assert st["decompose/buffered_tokens"] == 0
    assert st["decompose/dropped_tokens"] <= 8 * len(want)  # only tails shorter than 2^min_log2 + 1


def test_decompose_curriculum_table_drives_bucket_odds(tmp_path):
    glob = write_text_corpus(tmp_path, 160)
    cfg = {
        "sources": [glob],
        "stage": {"type": "decompose", "tokens_per_step": 256, "min_log2": 3, "max_log2": 6},
        "curriculum": {
            "buckets": {"table": [{"at": 0, "odds": [0, 0, 0, 1]}, {"at": 6, "odds": [1, 1, 1, 0]}]}
        },
    }
    batches = list(build_loader(cfg))
    seg_len = [len(next(segments(b))[2]) for b in batches]
    assert seg_len[:6] == [65] * 6  # steps 0..5: only D6
    assert 65 not in seg_len[6:12] and len(set(seg_len[6:])) > 1  # then everything but D6


def test_bucket_pad_mode_invariants_and_every_token_once(tmp_path):
    path = stage_config(tmp_path, "bucket")
    want = expected_docs(path)
    loader = build_loader(path, num_workers=2)
    batches = list(loader)
    bounds = [32, 128, 512]
    got: dict[int, list] = {}
    for b in batches:
        b.validate()
        segs = list(segments(b))
        buckets = {int(np.searchsorted(bounds, len(t))) for _, _, t in segs}
        assert len(buckets) == 1  # one bucket per batch
        j = buckets.pop()
        assert len(segs) <= 1024 // bounds[j] and b.num_tokens == len(segs) * bounds[j]  # padded rows
        for d, s, t in segs:
            got.setdefault(d, []).append((s, t))
    assert set(got) == set(want)
    for d, pieces in got.items():
        pieces.sort(key=lambda p: p[0])
        np.testing.assert_array_equal(np.concatenate([t for _, t in pieces]), want[d])
    st = loader.stats()
    assert st["bucket/emitted_tokens"] == st["bucket/input_tokens"] == sum(len(t) for t in want.values())
    assert st["bucket/truncated_tokens"] == st["bucket/dropped_tokens"] == 0


def test_bucket_max_length_schedule_caps_early_steps(tmp_path):
    lengths = [20] * 60 + [400] * 40  # documents of 21 and 401 tokens (EOS)
    glob = write_text_corpus(tmp_path, lengths=lengths)
    cfg = {
        "sources": [glob],
        "stage": {
            "type": "bucket",
            "boundaries": [32, 512],
            "tokens_per_step": 512,
            "mode": "pad",
            "buffer_tokens": 8192,
        },
        "curriculum": {
            "seqlen": {
                "schedule_type": "fixed_discrete",
                "schedule_config": {"difficulty": [32, 512], "max_step": [1]},
            }
        },
        "shuffle": {"seed": 0, "buffer": 100},
    }
    loader = build_loader(cfg)
    batches = list(loader)
    longest = [max(len(t) for _, _, t in segments(b)) for b in batches]
    assert longest[:2] == [21, 21] and longest[2] == 401  # steps 0, 1: max length 32, then 512
    st = loader.stats()
    assert st["bucket/emitted_tokens"] == 60 * 21 + 40 * 401
    assert st["bucket/over_cap_draws"] == 0


def test_seqlen_rows_follow_the_schedule_and_keep_every_token(tmp_path):
    from seqpack.curriculum import load_curriculum_config

    path = stage_config(tmp_path, "seqlen")
    schedule = load_curriculum_config(path).seqlen
    want = expected_docs(path)
    loader = build_loader(path)
    got: dict[int, list] = {}
    lengths = []
    for step, b in enumerate(loader):
        b.validate()
        L = schedule(step)
        lengths.append(L)
        assert int(b.seqlens[: b.n_real_segments].max()) <= L and b.num_real_tokens <= (512 // L) * L
        for d, s, t in segments(b):
            got.setdefault(d, []).append((s, t))
    assert lengths[0] == 32 and lengths[-1] == 256
    assert set(got) == set(want)
    for d, pieces in got.items():
        pieces.sort(key=lambda p: p[0])
        np.testing.assert_array_equal(np.concatenate([t for _, t in pieces]), want[d])
    st = loader.stats()
    assert st["seqlen/input_tokens"] == st["seqlen/emitted_tokens"] == sum(len(t) for t in want.values())


def test_chunkflow_chunks_cover_every_token(tmp_path):
    path = stage_config(tmp_path, "chunkflow")
    want = expected_docs(path)
    loader = build_loader(path)
    steps = list(loader)
    got: dict[int, list] = {}
    for chunks in steps:
        assert isinstance(chunks, list) and chunks and all(isinstance(c, Chunk) for c in chunks)
        assert sum(c.num_real_tokens for c in chunks) <= 1024 or len({c.chain_id for c in chunks}) == 1
        for c in chunks:
            c.batch.validate()
            assert c.batch.num_real_tokens <= 128
            for d, s, t in segments(c.batch):
                got.setdefault(d, []).append((s, t))
            if c.is_dependent:
                assert c.kv_prefix_len == c.chain_pos * 128
    assert set(got) == set(want)
    for d, pieces in got.items():
        pieces.sort(key=lambda p: p[0])
        np.testing.assert_array_equal(np.concatenate([t for _, t in pieces]), want[d])
    st = loader.stats()
    assert st["chunkflow/input_tokens"] == st["chunkflow/chunk_tokens"] == sum(len(t) for t in want.values())
    # targets: every token but each document's last predicts its successor
    assert st["chunkflow/loss_tokens"] == sum(len(t) - 1 for t in want.values())


def test_mil_batches_cover_each_slide_once_and_account_features(tmp_path):
    path = stage_config(tmp_path, "mil")
    loader = build_loader(path)
    batches = list(loader)
    assert all(isinstance(b, MILBatch) for b in batches)
    real = [b for b in batches if b.loss_scale]
    slides = [s for b in real for s in b.slide_ids.tolist()]
    assert sorted(slides) == list(range(14))
    for b in batches:
        b.validate()
        assert b.features.shape[0] == 96 and b.features.dtype == torch.float32
    st = loader.stats()
    lengths = [15 + 29 * i for i in range(14)]
    assert st["mil/input_features"] == sum(lengths)
    assert (
        st["mil/main_features"] + st["mil/residual_features"] + st["mil/discarded_features"]
        == sum(lengths) + st["mil/shared_features"]
    )


# ------------------------------------------------------------------------------------------ resume
def _run_with_states(path, num_workers, points):
    loader = build_loader(path, num_workers=num_workers)
    ref, states = [], {}
    for i, item in enumerate(loader):
        ref.append(fingerprint(item))
        if i + 1 in points:
            states[i + 1] = copy.deepcopy(loader.state_dict())
    return ref, states


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stage", ["decompose", "bucket", "seqlen", "chunkflow", "mil"])
def test_resume_at_random_points_is_identical(tmp_path, stage, num_workers):
    path = stage_config(tmp_path, stage, n_docs=160 if num_workers == 0 else 90)
    n = sum(1 for _ in build_loader(path, num_workers=num_workers))
    assert n >= 5
    rng = np.random.default_rng(len(stage) + num_workers)
    k = 4 if num_workers == 0 else 2
    points = set(rng.choice(np.arange(1, n), min(k, n - 1), replace=False).tolist())
    ref, states = _run_with_states(path, num_workers, points)
    assert len(ref) == n and set(states) == points
    for j, (p, state) in enumerate(sorted(states.items())):
        if j == 0:  # states survive torch.save / torch.load(weights_only=True)
            buf = io.BytesIO()
            torch.save(state, buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=True)
        resumed = build_loader(path, num_workers=num_workers)
        resumed.load_state_dict(state)
        rest = [fingerprint(x) for x in resumed]
        assert rest == ref[p:], f"{stage}: resume at step {p} differs"


# ------------------------------------------------------------------------------------------ ranks
@pytest.mark.parametrize("stage", ["decompose", "bucket", "seqlen", "chunkflow", "mil"])
def test_two_ranks_disjoint_documents_equal_steps(tmp_path, stage):
    path = stage_config(tmp_path, stage)
    per_rank = [list(build_loader(path, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    ids = [set().union(*(doc_ids_of(x) for x in items)) for items in per_rank]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    if stage == "mil":
        assert sorted(ids[0] | ids[1]) == list(range(14))
    elif stage != "decompose":  # decompose drops counted tails/leftovers; the others keep every document
        assert ids[0] | ids[1] == set(expected_docs(path))
    for items in per_rank:  # padding steps (a rank that ran out) carry no loss
        for x in items:
            if isinstance(x, VarlenBatch) and x.n_real_segments == 0:
                assert x.num_loss_tokens == 0 and (x.labels == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize(
    ("stage", "change", "match"),
    [
        (
            "decompose",
            {"stage": {"type": "decompose", "bufer_tokens": 1}},
            r"unknown keys \['bufer_tokens'\]",
        ),
        (
            "decompose",
            {"stage": {"type": "decompose", "overlong": "clip"}},
            r"stage.overlong: 'clip'.*'random', 'cap'",
        ),
        (
            "decompose",
            {"stage": {"type": "decompose", "tokens_per_step": 100}},
            r"stage.tokens_per_step \(100\) and curriculum.tokens_per_step \(256\) disagree",
        ),
        (
            "decompose",
            {"curriculum": {"tokens_per_step": 100, "decompose": {"min_log2": 3, "max_log2": 6}}},
            "divisible",
        ),
        (
            "decompose",
            {
                "curriculum": {
                    "tokens_per_step": 256,
                    "decompose": {"min_log2": 3, "max_log2": 6},
                    "buckets": {"n_cycles": 2},
                }
            },
            "curriculum.buckets.n_cycles",
        ),
        ("decompose", {"curriculum": {"tokens_per_step": 256, "progres": "steps"}}, r"unknown key 'progres'"),
        ("bucket", {"stage": {"type": "bucket", "mode": "crop"}}, r"stage.mode: 'crop'.*'pad', 'pack'"),
        ("bucket", {"curriculum": {"boundaries": [64, 32]}}, "boundaries"),
        ("bucket", {"stage": {"type": "bucket", "overflow": "wrap"}}, r"stage.overflow.*'split'"),
        (
            "chunkflow",
            {"stage": {"type": "chunkflow", "capacity": 0, "docs_per_step": 4}},
            "stage.capacity",
        ),
        ("chunkflow", {"stage": {"type": "chunkflow", "capacity": 8}}, "exactly one of 'docs_per_step'"),
        ("seqlen", {"stage": {"type": "seqlen", "rows": 3}}, r"unknown key 'rows'"),
        ("seqlen", {"curriculum": {"tokens_per_step": 512}}, "curriculum.seqlen"),
        ("mil", {"stage": {"type": "mil", "capacity": 96, "packlen": 3}}, r"stage.packlen: unknown key"),
        ("mil", {"stage": {"type": "mil", "capacity": 96, "num_epochs": 2}}, "stage.num_epochs"),
        ("mil", {"dtype": "int8"}, r"dtype: must be .*got 'int8'"),
    ],
)
def test_config_errors_name_the_key(tmp_path, stage, change, match):
    path = stage_config(tmp_path, stage)
    cfg = yaml.safe_load(open(path))
    cfg.update(change)
    write_config(tmp_path, yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=match):
        build_loader(path)


def test_toml_config_and_max_doc_len_error(tmp_path):
    glob = write_text_corpus(tmp_path, lengths=[10, 300, 20])
    path = tmp_path / "loader.toml"
    path.write_text(
        f'sources = ["{glob}"]\n[stage]\ntype = "chunkflow"\ncapacity = 64\n'
        "docs_per_step = 2\nmax_doc_len = 100\n"
    )
    with pytest.raises(ValueError, match=r"301 tokens > stage.max_doc_len=100"):
        list(build_loader(str(path)))
