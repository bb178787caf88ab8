"""A synthetic multimodal reasoning world: rendered grids and questions at graded difficulty.

The embedded default's stand-in for real benchmarks. It carries the paper's premise measurably: level 1
is answerable at a glance (a direct answer is as good as a trace); higher levels need one step per object
over the image, so a small model answering directly fails while a one-token-per-step trace succeeds
(docs/embedded_default.md: the "shell game").

Families (level = number of reasoning steps):
- count     (vision, level 1 only): how many cells are coloured (a glance).
- shell     (vision, levels 1..L): the ball starts under cup 1; in reading order each red cell swaps cups
            1-2, blue 2-3, green 1-3; under which cup is the ball?
- tally     (vision, levels 1..L): in reading order red adds 1, blue adds 2, green clears the total.
            (An order-free sum of cell values was tried first: a tiny model sums directly at every level,
            so it was no hard family.)
- shell_text (text-only, levels 1..L): the shell game told in words, from a given start cup.
- shell_mc  (vision, multiple choice, levels 1..L): the shell game with shuffled lettered options.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from PIL import Image

from bimode.errors import UsageError

GRID = 4
CELL_PX = 8  # one cell per 8x8 patch of the tiny SigLIP tower
IMAGE_PX = GRID * CELL_PX
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (30, 170, 60)}
EMPTY = (245, 245, 245)
SWAPS = {"red": (1, 2), "blue": (2, 3), "green": (1, 3)}
VALUES = {"red": 1, "blue": 2}  # tally: green clears the total
INITIAL = {"red": "r", "blue": "b", "green": "g"}
FAMILIES = ("count", "shell", "tally", "shell_text", "shell_mc")
# The demo's mix. shell_mc is left out: measured on the tiny model, 900 SFT steps left it at chance in both
# modes (mapping the tracked cup to its shuffled letter is a lookup the model does not learn in that budget).
DEFAULT_FAMILIES = ("count", "shell", "tally", "shell_text")
TEXT_ONLY_FAMILIES = ("shell_text",)
LETTERS = "ABC"
OBJECTS = ("ball", "coin", "ring", "key", "bead", "pearl")
DEFAULT_MAX_LEVEL = 6
EVAL_BUCKETS = 5  # one content hash in EVAL_BUCKETS goes to the eval split, the rest to train


@dataclass
class WorldSample:
    """One generated sample; `to_record()` turns it into the canonical record."""

    id: str
    family: str
    level: int
    question: str
    answer: str
    answer_type: str
    reasoning: str
    grid: tuple[str | None, ...] | None  # 16 cells in reading order, colour name or None
    choices: list[str] | None = None

    @property
    def domain(self) -> str:
        return "text" if self.family in TEXT_ONLY_FAMILIES else "vision"

    def render(self) -> Image.Image | None:
        return None if self.grid is None else render_grid(self.grid)

    def to_record(self):
        from bimode.data.records import Record

        image = self.render()
        return Record(
            id=self.id,
            question=("<image>\n" if image is not None else "") + self.question,
            answer=self.answer,
            answer_type=self.answer_type,
            images=[image] if image is not None else [],
            reasoning=self.reasoning,
            direct_answer=self.answer,
            choices=self.choices,
            family=self.family,
            level=self.level,
            domain=self.domain,
        )


def render_grid(grid) -> Image.Image:
    image = Image.new("RGB", (IMAGE_PX, IMAGE_PX), EMPTY)
    pixels = image.load()
    for index, colour in enumerate(grid):
        if colour is None:
            continue
        row, col = divmod(index, GRID)
        for y in range(row * CELL_PX + 1, (row + 1) * CELL_PX - 1):  # a 1-px border keeps cells apart
            for x in range(col * CELL_PX + 1, (col + 1) * CELL_PX - 1):
                pixels[x, y] = COLOURS[colour]
    return image


def _random_grid(rng: random.Random, n_coloured: int, colours=tuple(COLOURS)) -> tuple:
    cells = [None] * (GRID * GRID)
    for index in rng.sample(range(GRID * GRID), n_coloured):
        cells[index] = rng.choice(colours)
    return tuple(cells)


def _shell_steps(grid, start: int = 1) -> list[tuple[str, int]]:
    ball, steps = start, []
    for colour in grid:
        if colour is None:
            continue
        a, b = SWAPS[colour]
        ball = b if ball == a else a if ball == b else ball
        steps.append((colour, ball))
    return steps


def _count(rng, level):
    grid = _random_grid(rng, rng.randint(0, 6))
    coloured = [c for c in grid if c is not None]
    trace = " ".join(f"{INITIAL[c]}{i + 1}" for i, c in enumerate(coloured)) or "none"
    n = len(coloured)
    return "How many coloured cells?", str(n), "numeric", f"{trace} so {n}", grid, None


def _shell(rng, level):
    grid = _random_grid(rng, level)
    steps = _shell_steps(grid)
    trace = " ".join(f"{INITIAL[c]}{ball}" for c, ball in steps)
    answer = str(steps[-1][1])
    return "Where is the ball?", answer, "numeric", f"{trace} so {answer}", grid, None


def _tally(rng, level):
    grid = _random_grid(rng, level)
    total, running = 0, []
    for colour in grid:
        if colour is not None:
            total = 0 if colour == "green" else total + VALUES[colour]
            running.append(f"{INITIAL[colour]}{total}")
    question = "Red adds 1, blue adds 2, green clears. What is the total?"
    return question, str(total), "numeric", f"{' '.join(running)} so {total}", grid, None


def _shell_text(rng, level):
    # A varied start and object keep even level 1 from having only three possible questions.
    thing, start = rng.choice(OBJECTS), rng.randint(1, 3)
    moves = [rng.choice(tuple(SWAPS)) for _ in range(level)]
    steps = _shell_steps(moves, start)
    trace = " ".join(f"{INITIAL[c]}{ball}" for c, ball in steps)
    answer = str(steps[-1][1])
    question = f"The {thing} is under cup {start}. Swaps: {', '.join(moves)}. Where is the {thing}?"
    return question, answer, "numeric", f"{trace} so {answer}", None, None


def _shell_mc(rng, level):
    question, answer, _, trace, grid, _ = _shell(rng, level)
    cups = ["1", "2", "3"]
    rng.shuffle(cups)
    choices = list(cups)
    letter = LETTERS[cups.index(answer)]
    options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    return f"Where is the ball? {options}", letter, "mc", f"{trace} is {letter}", grid, choices


_GENERATORS = {"count": _count, "shell": _shell, "tally": _tally, "shell_text": _shell_text, "shell_mc": _shell_mc}


def family_levels(family: str, max_level: int = DEFAULT_MAX_LEVEL) -> list[int]:
    return [1] if family == "count" else list(range(1, max_level + 1))


def _content_key(family, question, grid) -> str:
    cells = "".join("." if c is None else c[0] for c in grid) if grid else ""
    return hashlib.sha256(f"{family}|{question}|{cells}".encode()).hexdigest()


def split_of(family: str, question: str, grid) -> str:
    """Assign by content hash, so two splits can never share an image-question pair, whatever the seeds."""
    return "eval" if int(_content_key(family, question, grid)[:8], 16) % EVAL_BUCKETS == 0 else "train"


def check_families(families) -> None:
    """Refuse names that are not families of the world, naming the field."""
    unknown = sorted(set(families) - set(_GENERATORS))
    if unknown or not families:
        raise UsageError(f"families: unknown families {unknown or '(none given)'}; known: {', '.join(FAMILIES)}")


def generate(
    n: int,
    seed: int = 0,
    split: str = "train",
    families: tuple[str, ...] | list[str] = DEFAULT_FAMILIES,
    max_level: int = DEFAULT_MAX_LEVEL,
    levels: list[int] | None = None,
    progress: bool = False,
) -> list[WorldSample]:
    """n samples, balanced over (family, level) pairs, deterministic in (seed, split)."""
    if split not in ("train", "eval"):
        raise UsageError(f"split must be 'train' or 'eval', not {split!r}")
    check_families(families)
    # Level-major order, so that even a small n covers every family.
    cells = sorted(((f, lv) for f in families for lv in family_levels(f, max_level) if levels is None or lv in levels),
                   key=lambda cell: (cell[1], list(families).index(cell[0])))
    if not cells:
        raise UsageError(f"no (family, level) pair matches families={families} levels={levels}")
    rng = random.Random(f"bimode-world|{seed}|{split}")
    samples = []
    iterator = range(n)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"synth {split}", unit="sample")
    for i in iterator:
        family, level = cells[i % len(cells)]
        for _ in range(10_000):
            question, answer, answer_type, reasoning, grid, choices = _GENERATORS[family](rng, level)
            if split_of(family, question, grid) == split:
                break
        else:  # pragma: no cover - only reachable with a degenerate family
            raise RuntimeError(f"could not draw a {split} sample for {family} level {level}")
        key = _content_key(family, question, grid)[:10]
        samples.append(
            WorldSample(f"{split}-{seed}-{i:06d}-{key}", family, level, question, answer, answer_type,
                        reasoning, grid, choices)
        )
    return samples


def corpus_text(n: int = 2000, seed: int = 12345) -> list[str]:
    """Text the tiny tokenizer is trained on: every question, trace and answer form the world produces."""
    from bimode.modes import format_target

    texts = []
    for s in generate(n, seed=seed, split="train"):
        texts.append(s.question)
        texts.append(format_target(s.answer, s.reasoning))
        texts.append(format_target(s.answer))
    return texts
