"""Activation memory of a training step, measured on slices of the model rather than guessed from a formula.

What autograd keeps for the backward pass depends on the layer's code and the attention kernel, so it is
measured: the language model is built alone with 1 and then 2 decoder layers and a 256-token vocabulary, run on
random ids at three short lengths with `torch.autograd.graph.saved_tensors_hooks` adding up every tensor saved
for backward (parameters and repeats of one storage left out). Two layers minus one is a layer; one layer
minus that is everything around the layers; three lengths fit `a + b s + c s^2` (c is the attention matrix an
eager kernel keeps; 0 with SDPA / flash). The vocabulary's share is added back by arithmetic: the logits in the
compute dtype and the fp32 log-softmax the loss keeps, per token scored. The vision tower is measured the same
way, per image, when it trains. A Qwen-VL tower takes an image's patches at the image's own size (its
`image_grid_thw`), so it is measured at three grids and fitted per patch like the text, with Qwen3-VL's deepstack
mergers (vision features fed into early LLM layers) measured as a slice of their own. A VLM whose text part has no
causal-LM class (Qwen-VL) is measured as its text model with an output layer and the causal-LM loss added.

With gradient checkpointing a layer (of the language model or the vision tower) keeps only its input and
recomputes the rest during backward, so the step holds all layers' inputs plus one layer's activations.

Measured on this machine's kernels (CPU SDPA keeps O(s) per layer, as flash-attention on GPUs); on a GPU the
figures hold for the same attention implementation. Slices are random-initialised in the compute dtype: a
4B-parameter model's two-layer slice takes about 1 GB and seconds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bimode.errors import UsageError

LENGTHS = (64, 128, 256)
SLICE_VOCAB = 256


@dataclass
class Fit:
    """bytes(s) = a + b s + c s^2 for one sequence (or one image, for the vision tower)."""

    a: float
    b: float
    c: float

    def __call__(self, s: int) -> float:
        return self.a + self.b * s + self.c * s * s

    @classmethod
    def through(cls, xs, ys) -> "Fit":
        a, b, c = torch.linalg.solve(torch.tensor([[1.0, x, x * x] for x in xs], dtype=torch.float64),
                                     torch.tensor(ys, dtype=torch.float64)).tolist()
        return cls(a, b, max(c, 0.0))


@dataclass
class TextActivations:
    layer: Fit  # one decoder layer, per sequence of s tokens
    outside: Fit  # embeddings, final norm, head and loss with the slice's vocabulary
    layers: int
    hidden: int
    vocab: int
    dtype_bytes: int

    def per_sequence(self, tokens: int, scored: int, checkpointing: bool) -> int:
        """Bytes kept for one sequence of `tokens`, `scored` of them in the loss."""
        head = scored * self.vocab * (self.dtype_bytes + 4) - scored * SLICE_VOCAB * 4
        if checkpointing:
            body = self.layers * tokens * self.hidden * self.dtype_bytes + self.layer(tokens)
        else:
            body = self.layers * self.layer(tokens)
        return int(self.outside(tokens) + body + max(head, 0))


def saved_bytes(model, run) -> int:
    """Bytes of the tensors autograd saves while `run()` executes, each storage once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def layers_key(config) -> str:
    """The config field holding the layer count: Qwen-VL towers name it `depth` (transformers from 5.2x also
    map num_hidden_layers to it; 5.17 does not)."""
    return "depth" if hasattr(config, "depth") else "num_hidden_layers"


def _slice(config, layers: int, **overrides):
    config = copy.deepcopy(config)
    setattr(config, layers_key(config), layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = config.layer_types[:layers]
    return config


def with_lora(model, lora: dict):
    """The slice as a LoRA run trains it: every weight frozen, adapters (PEFT's LoraConfig arguments `lora`) on the
    language model's linear layers; their dropout and low-rank products keep tensors of their own."""
    from peft import LoraConfig, get_peft_model

    from bimode.train.adapters import linear_targets

    for param in model.parameters():
        param.requires_grad_(False)
    return get_peft_model(model, LoraConfig(target_modules=linear_targets(model, ["llm"]), **lora))


class TextWithHead(torch.nn.Module):
    """A VLM's text model with an output layer and the causal-LM loss (Qwen-VL's text part has no causal-LM class
    of its own): what the VLM runs after its embeddings are merged, as a causal LM slice runs it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        weight = next(model.parameters())
        self.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False,
                                       dtype=weight.dtype)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, labels):
        logits = self.lm_head(self.model(input_ids=input_ids, use_cache=False).last_hidden_state)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())
        return type("Output", (), {"loss": loss})


def causal_lm(config, dtype: torch.dtype):
    """The language model alone, with its output layer: transformers' causal-LM class, or TextWithHead."""
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        try:
            return TextWithHead(AutoModel.from_config(config, dtype=dtype))
        except ValueError:
            raise UsageError(f"bimode plan builds the language model alone to measure it, and transformers cannot "
                             f"({type(config).__name__}: {exc})") from exc


def measure_text(text_config, dtype: torch.dtype, lora: dict | None = None) -> TextActivations:
    """Fits for one decoder layer and for what surrounds the layers (module docstring); `lora`: measured with
    adapters (with_lora)."""
    by_layers = {}
    for layers in (1, 2):
        config = _slice(text_config, layers, vocab_size=SLICE_VOCAB, tie_word_embeddings=False)
        model = causal_lm(config, dtype).train()
        if lora:
            model = with_lora(model, lora)
        sizes = []
        for s in LENGTHS:
            ids = torch.randint(0, SLICE_VOCAB, (1, s))
            sizes.append(saved_bytes(model, lambda: model(input_ids=ids, labels=ids).loss))
        by_layers[layers] = sizes
    layer = [two - one for one, two in zip(by_layers[1], by_layers[2])]
    outside = [one - per for one, per in zip(by_layers[1], layer)]
    return TextActivations(Fit.through(LENGTHS, layer), Fit.through(LENGTHS, outside), text_config.num_hidden_layers,
                           text_config.hidden_size, text_config.vocab_size, torch.finfo(dtype).bits // 8)


@dataclass
class VisionActivations:
    layer: int  # one encoder layer, per image
    outside: int  # patch embedding, final norm, pooling, per image
    layers: int
    layer_input: int  # one layer's input, per image: what a checkpointed layer keeps

    def per_image(self, checkpointing: bool) -> int:
        if checkpointing:
            return self.outside + self.layers * self.layer_input + self.layer
        return self.outside + self.layers * self.layer


def measure_vision(vision_config, dtype: torch.dtype) -> VisionActivations:
    """What the vision tower keeps per image when it trains (two slices, as the language model)."""
    from transformers import AutoModel

    sizes = []
    for layers in (1, 2):
        model = AutoModel.from_config(_slice(vision_config, layers), dtype=dtype).train()
        side = vision_config.image_size
        pixels = torch.randn(1, getattr(vision_config, "num_channels", 3), side, side, dtype=dtype)
        sizes.append(saved_bytes(model, lambda: model(pixel_values=pixels).last_hidden_state.float().sum()))
    per_layer = sizes[1] - sizes[0]
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return VisionActivations(per_layer, sizes[0] - per_layer, vision_config.num_hidden_layers,
                             patches * vision_config.hidden_size * (torch.finfo(dtype).bits // 8))


# Qwen-VL: grids (patches per side) the tower is measured at, in multiples of the 2 x 2 merge
GRID_SIDES = (8, 12, 16)


def _tower_output_sum(output) -> torch.Tensor:
    """Everything a tower returns (merged features, deepstack features: a ModelOutput or a tuple), summed."""
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    values = output.values() if hasattr(output, "values") else output
    return sum((_tower_output_sum(v) for v in values if isinstance(v, (torch.Tensor, tuple, list, dict))
                or hasattr(v, "values")), torch.zeros(()))


def measure_grid_vision(vision_config, tower_class, dtype: torch.dtype, grid: tuple[int, int]) -> VisionActivations:
    """A Qwen-VL tower per image of `grid` patches (height, width): slices of 1 and 2 layers without deepstack
    mergers and 1 layer with one, each at GRID_SIDES x GRID_SIDES patches, fitted per patch (a + b n + c n^2) and
    read at the grid's patches; every deepstack merger counts as the one measured."""
    channels = getattr(vision_config, "in_channels", None) or getattr(vision_config, "in_chans", 3)
    width = channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    deepstack = len(getattr(vision_config, "deepstack_visual_indexes", None) or [])
    builds = [(1, []), (2, [])] + ([(1, [0])] if deepstack else [])
    sizes = {build: [] for build in range(len(builds))}
    for side in GRID_SIDES:
        patches = torch.randn(side * side, width, dtype=dtype)
        grid_thw = torch.tensor([[1, side, side]])
        for i, (layers, stack) in enumerate(builds):
            overrides = {"deepstack_visual_indexes": stack} if deepstack else {}
            model = tower_class(_slice(vision_config, layers, **overrides)).to(dtype).train()
            sizes[i].append(saved_bytes(model, lambda: _tower_output_sum(model(patches, grid_thw=grid_thw))))
    counts = [side * side for side in GRID_SIDES]
    layer = Fit.through(counts, [two - one for one, two in zip(sizes[0], sizes[1])])
    outside = Fit.through(counts, [one - (two - one) for one, two in zip(sizes[0], sizes[1])])
    n = grid[0] * grid[1]
    merger = Fit.through(counts, [s - one for s, one in zip(sizes[2], sizes[0])])(n) if deepstack else 0
    return VisionActivations(int(layer(n)), int(outside(n) + deepstack * merger),
                             getattr(vision_config, layers_key(vision_config)),
                             n * vision_config.hidden_size * (torch.finfo(dtype).bits // 8))
