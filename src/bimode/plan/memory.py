"""What each GPU holds during a run, from counts and settings alone (pure arithmetic; `bimode plan`).

Figures per GPU, in bytes, each with where it comes from:
- model states (weights, gradients, optimizer state) by how they are sharded: DeepSpeed ZeRO-2 / ZeRO-3 as
  DeepSpeed's own estimators count them (`estimate_zero2_model_states_mem_needs`: 2 bytes of 16-bit weights per
  parameter, and 18 per trainable parameter split over the GPUs: 16-bit and fp32 gradients, fp32 master weights,
  Adam's two moments; ZeRO-3 keeps 4 bytes of the largest layer gathered instead of the whole 16-bit copy);
  otherwise (one process, DDP, FSDP2) the weights as loaded (fp32, bf16 runs autocast over them; 2 bytes when the
  recipe's `dtype` loads them in bf16), gradients in their dtype and Adam's two fp32 moments for the trainable
  parameters, FSDP2 sharding all three;
- the reference model for a KL term (beta > 0) without LoRA: a second copy of the weights in the compute dtype
  (with LoRA, TRL switches the adapter off instead);
- activations for the longest sequence of a step, measured on slices of the model (plan/activations.py);
- for BPO with vLLM colocated, vLLM's share of the GPU and the key/value cache one step's rollouts need.
The backward pass frees each layer's activations as it produces that layer's gradients, so the peak holds the
larger of the two, not their sum (a row takes the smaller back off); while it works through a layer it also holds
the gradients of that layer's activations, about one layer's activations more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2 ** 30


@dataclass
class Setup:
    """How a run is laid out: counts of the model (plan/model_shape.py) and settings of the recipe and launch."""

    total_params: int
    trainable_params: int
    largest_layer_params: int
    num_gpus: int = 1
    sharding: str = "none"  # none (one process or DDP), zero2, zero3, fsdp2
    compute_bytes: int = 4  # 2 with bf16 / fp16, 4 in fp32
    weight_bytes: int = 4  # how the weights are stored without DeepSpeed: fp32, or 2 when loaded in bf16 (`dtype`)
    lora: bool = False
    reference_model: bool = False
    activation_bytes: int = 0  # per GPU, for the step's longest batch, as the checkpointing setting has it
    backward_bytes: int = 0  # the backward's working set: the gradients of one layer's activations
    gpu_bytes: int = 80 * GIB
    vllm_share: float = 0.0  # vllm_gpu_memory_utilization when vLLM is colocated, else 0
    vllm_weight_bytes: int = 0  # the engine's copy of the weights (compute dtype)
    kv_bytes_needed: int = 0  # the key/value cache one step's rollouts need (vLLM or bimode's engine)
    generation_on_vllm: bool = False


@dataclass
class Row:
    what: str
    bytes: int
    source: str


@dataclass
class Plan:
    rows: list[Row]
    gpu_bytes: int
    fits: bool
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows)


def model_states(s: Setup) -> list[Row]:
    """Weights, gradients and optimizer state per GPU."""
    n, p, t = s.num_gpus, s.total_params, s.trainable_params
    if s.sharding == "zero2":
        return [Row("weights (16-bit)", 2 * p, "DeepSpeed ZeRO-2 estimator: 2 bytes/param"),
                Row("gradients (16- and 32-bit, sharded)", 6 * t // n, "DeepSpeed ZeRO-2 estimator: 6 bytes/trainable param / GPUs"),
                Row("optimizer (fp32 master + Adam, sharded)", 12 * t // n,
                    "DeepSpeed ZeRO-2 estimator: 12 bytes/trainable param / GPUs")]
    if s.sharding == "zero3":
        frozen = 2 * (p - t) // n  # LoRA: the frozen 16-bit base is sharded too (the estimator counts trainable)
        return [Row("weights (largest layer gathered, frozen base sharded)", 4 * s.largest_layer_params + frozen,
                    "DeepSpeed ZeRO-3 estimator: 4 bytes x largest layer"),
                Row("gradients (16- and 32-bit, sharded)", 6 * t // n, "DeepSpeed ZeRO-3 estimator: 6 bytes/trainable param / GPUs"),
                Row("optimizer (fp32 master + Adam, sharded)", 12 * t // n,
                    "DeepSpeed ZeRO-3 estimator: 12 bytes/trainable param / GPUs")]
    shard = n if s.sharding == "fsdp2" else 1
    how = "sharded by FSDP2" if shard > 1 else "replicated"
    w = s.weight_bytes
    return [Row(f"weights ({how})", w * p // shard, f"{w} bytes/param"),
            Row(f"gradients ({how})", w * t // shard, f"{w} bytes/trainable param"),
            Row(f"optimizer (Adam moments, {how})", 8 * t // shard, "8 bytes/trainable param")]


def plan(s: Setup, checkpointing: bool) -> Plan:
    rows = model_states(s)
    if s.reference_model:
        shard = s.num_gpus if s.sharding in ("zero3", "fsdp2") else 1
        rows.append(Row("reference model (KL)", s.compute_bytes * s.total_params // shard,
                        "a copy of the weights in the compute dtype"))
    rows.append(Row(f"activations (checkpointing {'on' if checkpointing else 'off'})", s.activation_bytes,
                    "measured on slices of the model (plan/activations.py)"))
    gradients = rows[1].bytes
    rows.append(Row("less: backward frees activations as gradients fill", -min(gradients, s.activation_bytes),
                    "the peak holds the larger of the two, not both"))
    rows.append(Row("backward working set", s.backward_bytes,
                    "gradients of one layer's activations (the slices' layer)"))
    if s.generation_on_vllm:
        rows.append(Row(f"vLLM (gpu_memory_utilization {s.vllm_share:g})", int(s.vllm_share * s.gpu_bytes),
                        "vLLM reserves this share of the GPU"))
    elif s.kv_bytes_needed:
        rows.append(Row("rollouts' key/value cache (bimode's engine)", s.kv_bytes_needed,
                        "2 x layers x kv heads x head dim x tokens"))
    result = Plan(rows, s.gpu_bytes, fits=False)
    kv_room = int(s.vllm_share * s.gpu_bytes) - s.vllm_weight_bytes if s.generation_on_vllm else None
    result.fits = result.total <= s.gpu_bytes and (kv_room is None or kv_room > 0)
    result.advice = advise(s, result, checkpointing, kv_room)
    if kv_room is not None and 0 < kv_room < s.kv_bytes_needed:
        # vLLM schedules what its cache holds and queues the rest: slower, not out of memory
        result.notes.append(f"vLLM's share leaves {kv_room / GIB:.1f} GiB of key/value cache; a step's rollouts at "
                            f"full length need {s.kv_bytes_needed / GIB:.1f} GiB, so about "
                            f"{kv_room / s.kv_bytes_needed:.0%} of them run at once and the rest wait (raise "
                            "vllm_gpu_memory_utilization for more at once)")
    return result


def advise(s: Setup, p: Plan, checkpointing: bool, kv_room: int | None) -> list[str]:
    """What to change when it does not fit, most effective first (by the rows that are largest)."""
    if p.fits:
        return []
    out = []
    if kv_room is not None and kv_room <= 0:
        out.append(f"vLLM's share ({s.vllm_share:g} of the GPU) does not hold its copy of the weights "
                   f"({s.vllm_weight_bytes / GIB:.1f} GiB): raise vllm_gpu_memory_utilization")
    if p.total > s.gpu_bytes:
        over = (p.total - s.gpu_bytes) / GIB
        states = sum(r.bytes for r in p.rows[:3])  # weights, gradients, optimizer
        if not checkpointing:
            out.append("turn on gradient_checkpointing (activations are kept per layer otherwise)")
        if not s.lora:
            out.append("train LoRA adapters (--use_peft): gradients and optimizer state only for the adapters")
        if s.sharding in ("none", "zero2") and s.num_gpus > 1:
            out.append("shard the weights too: ZeRO-3 or FSDP2 (launch config zero3 / fsdp2)")
        if s.sharding == "none" and s.num_gpus > 1 and states > s.gpu_bytes / 4:
            out.append("shard gradients and optimizer state: ZeRO-2 (launch config zero2)")
        if s.sharding != "none" or s.num_gpus == 1:
            out.append("more GPUs (sharded states divide by their number)")
        out.append("a smaller batch or group (per_device_train_batch_size, num_generations) or a shorter maximum "
                   f"length: activations grow with both; {over:.1f} GiB over")
    return out


def table(p: Plan) -> str:
    unit, name = (GIB, "GiB") if max(p.total, p.gpu_bytes) >= GIB else (2 ** 20, "MiB")
    width = max(len(r.what) for r in p.rows)
    lines = [f"{'what each GPU holds':<{width}}  {name:>8}  from"]
    lines += [f"{r.what:<{width}}  {r.bytes / unit:8.2f}  {r.source}" for r in p.rows]
    lines.append(f"{'peak':<{width}}  {p.total / unit:8.2f}  of {p.gpu_bytes / unit:.0f} {name}")
    lines.append("verdict: fits" if p.fits else "verdict: does not fit; change, most effective first:")
    lines += [f"  - {a}" for a in p.advice]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
