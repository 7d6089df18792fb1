"""Part-filled rows held back for a later plan, so a run's fill matches one global plan.

Packing each task (and each window of a task) alone would end every plan in part-filled rows:
``T`` tasks give about ``T`` extra rows. Instead, for the packing strategy (``pack``), a window's
part-filled rows are not written; their pieces are *held back*:

- a row is **part-filled** when its free room is at least ``capacity / TAIL_ROOM`` tokens
  (fill below 127/128); of those, the ``TAIL_ROWS`` least-filled rows are held back (ties by row
  index), which bounds what a window carries and a task leaves to ``TAIL_ROWS * capacity`` tokens;
- the held pieces (documents or pieces of split documents, with their offsets) are planned again
  with the next window's documents, so a task behaves as one plan over all its windows;
- the last window's held pieces are the task's **tail**, stored in ``.seqpack/tail-KKKKK.npz``
  (written atomically before the task marker, so a finished task always has one);
- the merge (after every task, in :func:`seqpack.preprocess.executors.preprocess`) plans all tails
  together (task order, the same planner, seed ``seed + tasks``) and writes their rows as the
  shards ``part-TTTTT-JJJJ`` (``T`` = number of tasks), listed last in the manifest.

The merge is deterministic and rewrites the same bytes when rerun, so tasks stay independent and
resumable (a held piece is saved in its window's file, which is the unit of resume) and every
executor gives the same output. Nothing is lost: held pieces are at most ``capacity`` tokens, so
planning them again cuts nothing; every token is written once, by its task or by the merge.
``decompose`` and ``none`` rows are never held back (their rows do not share room).
"""

from __future__ import annotations

import numpy as np

from seqpack.sources.records import Document

# Measured on 600 real documents (source files) in 4 tasks at 4096: holding rows with room >= 1/64
# or at most 16 rows left one case 2 rows above a single global plan; 1/128 and 32 rows met it
TAIL_ROOM = 128  # a row with at least capacity / 128 free tokens is part-filled
TAIL_ROWS = 32  # at most this many part-filled rows held back per window (and per task)
PIECE_KEYS = ("doc_id", "start", "length", "tokens", "loss_mask")


def held_rows(row_tokens: np.ndarray, row_capacity: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the rows to hold back: the ``TAIL_ROWS`` least-filled part-filled rows."""
    room = row_capacity - row_tokens
    part = np.flatnonzero(room * TAIL_ROOM >= row_capacity)
    least = part[np.lexsort((part, row_tokens[part]))][:TAIL_ROWS]
    return np.sort(least)


def pieces_of(
    docs: list[Document], seg_doc: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray
) -> list[Document]:
    """One document per segment: its tokens and mask, ``start`` counted in the original document."""
    out = []
    for i, s, n in zip(seg_doc.tolist(), seg_start.tolist(), seg_len.tolist()):
        d = docs[i]
        mask = None if d.loss_mask is None else d.loss_mask[s : s + n]
        out.append(Document(doc_id=d.doc_id, tokens=d.tokens[s : s + n], loss_mask=mask, start=d.start + s))
    return out


def pieces_arrays(pieces: list[Document]) -> dict[str, np.ndarray]:
    """Pieces as flat arrays (keys ``piece_*``) for an npz file."""
    lengths = np.fromiter((len(p.tokens) for p in pieces), np.int64, len(pieces))
    tokens = np.concatenate([p.tokens for p in pieces]).astype(np.int32) if pieces else np.zeros(0, np.int32)
    masks = [np.ones(len(p.tokens), np.uint8) if p.loss_mask is None else p.loss_mask for p in pieces]
    arrays = {
        "doc_id": np.fromiter((p.doc_id for p in pieces), np.int64, len(pieces)),
        "start": np.fromiter((p.start for p in pieces), np.int64, len(pieces)),
        "length": lengths,
        "tokens": tokens,
        "loss_mask": np.concatenate(masks).astype(np.uint8) if pieces else np.zeros(0, np.uint8),
    }
    return {f"piece_{k}": v for k, v in arrays.items()}


def pieces_from(z) -> list[Document]:
    """The pieces stored by :func:`pieces_arrays` in an open npz (none when it has no pieces)."""
    if "piece_doc_id" not in z:
        return []
    a = {k: z[f"piece_{k}"] for k in PIECE_KEYS}
    off = np.zeros(len(a["length"]) + 1, np.int64)
    np.cumsum(a["length"], out=off[1:])
    return [
        Document(
            doc_id=int(a["doc_id"][i]),
            tokens=a["tokens"][off[i] : off[i + 1]].astype(np.int64),
            loss_mask=a["loss_mask"][off[i] : off[i + 1]].astype(bool),
            start=int(a["start"][i]),
        )
        for i in range(len(a["length"]))
    ]


def load_pieces(path: str) -> list[Document]:
    """The pieces stored in the npz file ``path``."""
    with np.load(path) as z:
        return pieces_from(z)
