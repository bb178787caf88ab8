"""Duplicate and near-duplicate questions, found as the rows stream by, with memory that does not grow with them.

A row repeats an earlier kept row when both have the same images and the same normalised question (exact), or when
their word-trigram Jaccard similarity is at least the threshold (near). Comparing every row with every earlier one
is quadratic (a hundred thousand text-only rows are five billion comparisons), so near-duplicates are looked up by
MinHash locality-sensitive hashing (Broder 1997; Leskovec, Rajaraman and Ullman, *Mining of Massive Datasets*,
ch. 3): each question's trigram set gets `b * r` min-hashes, cut into `b` bands of `r`; a row whose band equals the
band an earlier kept row (the first with it) put there is a candidate, and a candidate counts only when its exact
Jaccard similarity reaches the threshold. `b` and `r` follow from the threshold so that a pair at the threshold
shares at least one band with probability 1 - 1e-4 or more; the hashes are seeded, so the same rows give the same
verdicts in every run and process. Everything kept per row (the hashes, the kept questions for the exact check)
lives in a `DiskIndex`.
"""

from __future__ import annotations

import math
import string
import zlib

import numpy as np

from bimode.disk_index import DiskIndex, key64

MISS = 1e-4  # at most this chance that a pair at the threshold shares no band
_PRIME = (1 << 61) - 1
_TABLES = {"exact": ("ord",), "kept": ("id", "image", "text"), "band": ("ord",)}


_PUNCTUATION_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    return " ".join(text.lower().replace("<image>", " ").translate(_PUNCTUATION_TO_SPACE).split())


def shingles(text: str, n: int = 3) -> set:
    words = text.split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def bands_for(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) for a threshold: rows so that a pair at the threshold agrees on a band 60% of the time
    or more (longer bands pass fewer dissimilar candidates; more of them cost an index entry each per kept row), bands
    so that it misses all of them with probability at most MISS."""
    if threshold >= 1:
        return 1, 4  # identical trigram sets: every min-hash agrees
    rows = max(1, math.floor(math.log(0.6) / math.log(threshold)))
    agree = threshold ** rows
    return max(1, math.ceil(math.log(MISS) / math.log(1 - agree))), rows


class DuplicateFinder:
    """`check(id, image_key, question)`: the id of the earlier kept row this one repeats, or None (then it is kept).
    `threshold` above 1 finds exact duplicates only."""

    def __init__(self, threshold: float = 0.9, index: DiskIndex | None = None, seed: int = 0):
        if threshold <= 0:
            raise ValueError(f"near_duplicate_threshold must be above 0 (above 1: exact duplicates only), got "
                             f"{threshold}")
        self.threshold = threshold
        self.index = index or DiskIndex(None)
        for name, columns in _TABLES.items():
            self.index.table(name, columns)
        self.kept = self.index.count("kept")
        self.bands, self.rows = bands_for(min(threshold, 1.0))
        rng = np.random.default_rng(seed)
        count = self.bands * self.rows
        self._a = rng.integers(1, 1 << 31, count, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 31, count, dtype=np.uint64)
        self._mix = rng.integers(1, 2**63, self.rows, dtype=np.uint64) | np.uint64(1)  # odd: no value is lost
        self._salt = rng.integers(0, 2**63, self.bands, dtype=np.uint64)  # band b's keys are not band c's

    def check(self, row_id: str, image_key: str, question: str) -> str | None:
        text = normalize(question)
        exact = key64(image_key, text)
        hit = self.index.get("exact", exact)
        if hit:
            first_id, first_image, first_text = self.index.get("kept", hit[0])
            if (first_image, first_text) == (image_key, text):
                return first_id
        mine = shingles(text)
        band_keys = self._band_keys(image_key, mine) if self.threshold <= 1 else []
        for candidate in self.index.values_of("band", band_keys):
            first_id, first_image, first_text = self.index.get("kept", candidate)
            if first_image == image_key and jaccard(mine, shingles(first_text)) >= self.threshold:
                return first_id
        ordinal = self.kept
        self.kept += 1
        self.index.put("kept", ordinal, row_id, image_key, text)
        self.index.put("exact", exact, ordinal)
        self.index.put_many("band", ((k, ordinal) for k in band_keys))
        return None

    def _band_keys(self, image_key: str, mine: set) -> list[int]:
        """One key per band: its `rows` min-hashes, the band's number and the images, mixed into 64 bits."""
        hashes = np.fromiter((zlib.crc32(s.encode("utf-8", "surrogatepass")) for s in mine), np.uint64, len(mine))
        signature = ((hashes[:, None] * self._a + self._b) % _PRIME).min(axis=0)  # a*x < 2^63: no overflow
        bands = signature.reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
            mixed = (bands * self._mix).sum(axis=1) + self._salt + np.uint64(key64(image_key) & (2**64 - 1))
        return mixed.view(np.int64).tolist()
