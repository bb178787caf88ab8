"""Activation memory of a training step, measured on slices of the model rather than guessed from a formula.

What autograd keeps for the backward pass depends on the layer's code and the attention kernel, so it is
measured: the language model is built alone with 1 and then 2 decoder layers and a 256-token vocabulary, run on
random ids at three short lengths with `torch.autograd.graph.saved_tensors_hooks` adding up every tensor saved
for backward (parameters and repeats of one storage left out). Two layers minus one is a layer; one layer
minus that is everything around the layers; three lengths fit `a + b s + c s^2` (c is the attention matrix an
eager kernel keeps; 0 with SDPA / flash). The vocabulary's share is added back by arithmetic: the logits in the
compute dtype and the fp32 log-softmax the loss keeps, per token scored. The vision tower is measured the same
way, per image, when it trains.

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


def _slice(config, layers: int, **overrides):
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
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


def measure_text(text_config, dtype: torch.dtype, lora: dict | None = None) -> TextActivations:
    """Fits for one decoder layer and for what surrounds the layers (module docstring); `lora`: measured with
    adapters (with_lora)."""
    from transformers import AutoModelForCausalLM

    by_layers = {}
    for layers in (1, 2):
        config = _slice(text_config, layers, vocab_size=SLICE_VOCAB, tie_word_embeddings=False)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
        except ValueError as exc:
            raise UsageError(f"bimode plan builds the language model alone to measure it, and transformers cannot "
                             f"({type(text_config).__name__}: {exc})") from exc
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
