"""A generation cycle piece by piece, at a model shape too large to train here, and the cycle ratios and peak memory
that follow for the whole model: a PROJECTION, not a measurement of a trainer.

At Qwen2.5-7B's shape (hidden 3584, 28 layers, 28 / 4 heads, intermediate 18944, V = 152,064, untied head) a trainer
holds ~110 GiB in fp32; this machine has 24. What fits is measured in one process, on `bench_steps.py`'s batch (B
completions of P prompt + L completion tokens per optimizer step; off-policy: steps_per_generation completions
batches per generation):

- the backbone at 1 and at 3 decoder layers (half the difference is one layer; the rest is its constant part:
  rotary embedding, mask, final norm; 3 rather than 2 layers halves the timing noise in the per-layer figure):
  forward without grad on B and spg x B rows (reference and old-log-prob passes), forward + backward on B rows
  (training), and generation's backbone work (a prefill of P tokens, then L - 1 decode steps with a KV cache) on B
  and spg x B rows;
- the LM head at the full vocabulary: TRL's fused log-prob function (`trl.kernels.ChunkedLogProbFunction`, what TRL's
  training forward and its old-log-prob and reference passes run; on the completion positions only, TRL's path on a
  GPU) forward, and forward + backward; generation's projection and sampling, L tokens;
- DGPO's divergence pass (`dgpo_trl.functional.token_statistics`: two LM heads) on the same tokens;
- one fused AdamW step (the Trainer's default), per parameter (on at least 2^27 parameters, copies of a decoder
  layer's), scaled to the model's parameter count.

`compose` adds them up as the trainers run them, per generation cycle and variant (see its docstring), with
`layers` decoder layers. Peak memory is projected likewise: resident tensors (policy, its gradients, AdamW's two
states, the reference) plus the largest transient of the cycle (training activations of every layer plus the
LM head's backward; DGPO's loss-time pass on top of the forward's activations on the aligned path). Run at
Qwen2.5-0.5B's shape, the projection can be checked against `bench_steps.py`'s end-to-end measurement there.

    python benchmarks/bench_layers.py --shape qwen2.5-7b      # ~11 GiB peak, 2 threads
    python benchmarks/bench_layers.py --shape qwen2.5-0.5b    # the check against bench_steps' measured cycles
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    format_table,
    machine_info,
    peak_extra_memory,
    set_malloc,
    time_call,
    write_results,
)
from bench_steps import PATHS, SHAPES  # noqa: E402

LAYERS = (1, 3)  # the backbone depths measured


def backbone(spec: dict, layers: int):
    """A Qwen2 backbone of `spec`'s width with `layers` decoder layers. Its inputs are given as embeddings (the token
    embedding has 2 rows): the embedding and the LM head are measured apart, at the full vocabulary."""
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(
        vocab_size=2,
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    return Qwen2Model(config).float()


def timed(fn, repeats: int, device) -> float:
    """Median seconds of `repeats` calls, after one untimed call."""
    fn()
    return statistics.median(time_call(fn, device) for _ in range(repeats))


def measure_backbone(spec, rows: dict, prompt: int, completion: int, repeats: int, device) -> dict:
    """{(what, rows name): {"per_layer": s, "constant": s}} and the training transient per layer (bytes)."""
    seq = prompt + completion
    raw = {}
    for layers in LAYERS:
        model = backbone(spec, layers).to(device).eval()
        for name, r in rows.items():
            x = torch.randn(r, seq, spec["hidden"], device=device) * 0.02
            mask = torch.ones(r, seq, dtype=torch.long, device=device)
            with torch.no_grad():
                raw[("forward", name, layers)] = timed(
                    lambda: model(inputs_embeds=x, attention_mask=mask, use_cache=False), repeats, device
                )
            prompt_x = x[:, :prompt].contiguous()
            step_x = x[:, :1].contiguous()

            def generate_backbone():
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
                with torch.no_grad():
                    model(inputs_embeds=prompt_x, past_key_values=cache, use_cache=True)
                    for _ in range(completion - 1):
                        model(inputs_embeds=step_x, past_key_values=cache, use_cache=True)

            raw[("generate", name, layers)] = timed(generate_backbone, repeats, device)
            if name == "step":
                model.train()

                def forward_backward():
                    model.zero_grad(set_to_none=True)  # as the trainer: fresh gradients every step
                    hidden = model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
                    (hidden * 1e-3).sum().backward()

                raw[("train", name, layers)] = timed(forward_backward, repeats, device)
                model.zero_grad(set_to_none=True)

                def forward_kept():
                    # The activations a training forward keeps for its backward (the graph holds them)
                    return model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state

                raw[("activations", name, layers)] = peak_extra_memory(forward_kept, device)
                model.eval()
            x = mask = None  # freed before the next allocation (the closures above hold the names)
        model = None
        gc.collect()
    low, high = LAYERS
    parts = {}
    for key in {k[:2] for k in raw}:
        per_layer = (raw[key + (high,)] - raw[key + (low,)]) / (high - low)
        parts[key] = dict(per_layer=per_layer, constant=raw[key + (low,)] - low * per_layer)
    return parts


def measure_head(spec, tokens: dict, rows: dict, completion: int, repeats: int, device) -> dict:
    """TRL's fused head (reference: log-probs; policy: log-probs and entropy, as TRL asks), its forward + backward,
    generation's projection + sampling, and DGPO's pass; seconds, and peak extra bytes where it matters."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from dgpo_trl.functional import token_statistics

    h, vocab = spec["hidden"], spec["vocab"]
    torch.manual_seed(1)
    weight = torch.randn(vocab, h, device=device) * 0.02
    out = {}
    for name, n in tokens.items():
        hidden = torch.randn(n, h, device=device)
        labels = torch.randint(0, vocab, (n,), device=device)
        args = (None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0)
        with torch.no_grad():
            out[("head_reference", name)] = timed(
                lambda: ChunkedLogProbFunction.apply(hidden, weight, *args, ("log_probs",)), repeats, device
            )
            out[("head_policy", name)] = timed(
                lambda: ChunkedLogProbFunction.apply(hidden, weight, *args, ("log_probs", "entropy")), repeats, device
            )
            ref_weight = weight + 0.01 * torch.randn_like(weight)
            ref_hidden = hidden + 0.1 * torch.randn_like(hidden)

            def divergence():
                return token_statistics(hidden, weight, ref_hidden, ref_weight)  # the trainer asks for no labels

            out[("divergence", name)] = timed(divergence, repeats, device)
            out[("divergence_bytes", name)] = peak_extra_memory(divergence, device)
            ref_weight = ref_hidden = None
        if name == "step":
            w = weight.clone().requires_grad_(True)
            x = hidden.clone().requires_grad_(True)

            def forward_backward():
                w.grad = x.grad = None
                logps, entropy, *_ = ChunkedLogProbFunction.apply(x, w, *args, ("log_probs", "entropy"))
                logps.sum().backward()

            out[("head_train", name)] = timed(forward_backward, repeats, device)
            out[("head_train_bytes", name)] = peak_extra_memory(forward_backward, device)
            w = x = None
        gc.collect()
    for name, r in rows.items():
        x = torch.randn(r, h, device=device)

        def sample():
            # What generation does per token after the backbone: project the last position, soften, sample
            for _ in range(completion):
                logits = torch.nn.functional.linear(x, weight)
                torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)

        out[("generate_head", name)] = timed(sample, repeats, device)
    return out


def measure_adamw(spec, repeats: int, device, min_params: int = 2**27) -> float:
    """Seconds per parameter of one AdamW step (fused, as the Trainer's default `adamw_torch_fused`; weight decay 0),
    over copies of one decoder layer's parameters totalling at least `min_params`: an optimizer step streams its
    parameters, gradients and two states through memory, and a set that fits in the caches would time too fast."""
    layer = backbone(spec, 1).layers[0].to(device)
    copies = -(-min_params // sum(p.numel() for p in layer.parameters()))
    params = [torch.nn.Parameter(p.detach().clone()) for _ in range(copies) for p in layer.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=True)
    return timed(optimizer.step, repeats, device) / sum(p.numel() for p in params)


def parameter_count(spec) -> dict:
    """The full model's parameters (Qwen2: q/k/v with bias, o without; SwiGLU MLP; two RMSNorms per layer)."""
    h, i = spec["hidden"], spec["intermediate"]
    kv = spec["kv_heads"] * (h // spec["heads"])
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    embedding = spec["vocab"] * h
    return dict(
        per_layer=per_layer,
        embedding=embedding,
        total=spec["layers"] * per_layer + embedding * (1 if spec["tied"] else 2) + h,
    )


def compose(m: dict, spec: dict, spg: int, zero_fraction: float, batch: int, layers: int | None = None) -> dict:
    """Projected seconds per generation cycle and peak bytes, per path and variant, at `layers` decoder layers.

    With bb(what) = constant + layers x per_layer, head(...) TRL's fused head, div DGPO's pass, on the cycle's rows:
      train step      = bb(train) + head_train + AdamW x parameters
      generation      = bb(generate) + generate_head
      GRPO(beta=0)    = generation + spg x train step [+ bb(forward) + head_policy: old log-probs, when spg > 1]
      GRPO(beta=0.04) = GRPO(beta=0) + bb(forward) + head_reference
      DGPO            = GRPO(beta=0) + s x (bb(forward) + div)   (s: the scored fraction, 1 - z on the aligned path
                                                                  with z the zero-advantage fraction, 1 at spg > 1:
                                                                  TRL's old-log-prob pass runs as GRPO's, and DGPO
                                                                  takes the policy's hidden states from it)
                        - spg x z x (bb(train) + head_train)     (the training forward and backward of the zero-
                                                                  advantage rows, skipped; the optimizer step is not)
                        + spg x z x (bb(train) + head_train) / B (a micro-batch with nothing to train still runs one
                                                                  of its B rows, its loss multiplied by 0: here a
                                                                  micro-batch is one group, so every zero-advantage
                                                                  group is one such micro-batch; a row counted as 1/B
                                                                  of the step, as on a CPU)
      DGPO, dropout   = DGPO + s x bb(forward)                   (a policy whose train-mode forward has dropout: the
                                                                  statistics' dropout-free policy forward)
      floor           = 1 + DGPO's reference backbone / GRPO(beta=0)
    """
    layers = spec["layers"] if layers is None else layers

    def bb(what, name):
        part = m["backbone"][(what, name)]
        return part["constant"] + layers * part["per_layer"]

    head, params = m["head"], parameter_count(dict(spec, layers=layers))
    optimizer = m["adamw_s_per_param"] * params["total"]
    train_step = bb("train", "step") + head[("head_train", "step")] + optimizer
    # Resident: policy, its gradients and AdamW's two states, and the reference, all fp32
    resident = 4 * params["total"] * 5
    activations = bb("activations", "step")
    out = {}
    for path, steps in (("aligned", 1), ("offpolicy", spg)):
        name = "step" if steps == 1 else "generation"
        generate = bb("generate", name) + head[("generate_head", name)]
        old = bb("forward", name) + head[("head_policy", name)] if steps > 1 else 0.0
        base = generate + steps * train_step + old
        reference = bb("forward", name)
        scored = 1.0 - zero_fraction if steps == 1 else 1.0
        skipped = steps * zero_fraction * (bb("train", "step") + head[("head_train", "step")]) * (1 - 1 / batch)
        dgpo = base + scored * (reference + head[("divergence", name)]) - skipped
        train_peak = activations + head[("head_train_bytes", "step")]
        # DGPO's aligned-path pass runs at loss time, with the training forward's activations alive
        dgpo_peak = (
            max(train_peak, activations + head[("divergence_bytes", name)])
            if steps == 1
            else max(train_peak, head[("divergence_bytes", name)])
        )
        out[path] = dict(
            seconds={
                "grpo_beta0": base,
                "grpo_beta0.04": base + reference + head[("head_reference", name)],
                "dgpo": dgpo,
                "dgpo_dropout": dgpo + scored * bb("forward", name),
            },
            floor=1.0 + scored * reference / base,
            peak_bytes={
                "grpo_beta0.04": resident + train_peak,
                "dgpo": resident + dgpo_peak,
                "grpo_beta0": resident * 4 / 5 + train_peak,
            },
            parts=dict(
                generation=generate,
                train_step=train_step,
                optimizer=optimizer,
                old_log_probs=old,
                skipped=skipped,
                reference_backbone=reference,
                head_reference=head[("head_reference", name)],
                divergence=head[("divergence", name)],
            ),
        )
    return out


def projection_rows(m, spec, spg, zero_fractions, batch, layers=None) -> list[dict]:
    rows = []
    for z in zero_fractions:
        for path, c in compose(m, spec, spg, z, batch, layers).items():
            s, p = c["seconds"], c["peak_bytes"]
            rows.append(
                dict(
                    path=path,
                    zero_fraction=z,
                    grpo_beta0_s=s["grpo_beta0"],
                    grpo_beta004_s=s["grpo_beta0.04"],
                    dgpo_s=s["dgpo"],
                    dgpo_over_grpo004=s["dgpo"] / s["grpo_beta0.04"],
                    dgpo_over_grpo0=s["dgpo"] / s["grpo_beta0"],
                    floor=c["floor"],
                    dgpo_dropout_over_grpo004=s["dgpo_dropout"] / s["grpo_beta0.04"],
                    peak_gib_grpo004=p["grpo_beta0.04"] / 2**30,
                    peak_gib_dgpo=p["dgpo"] / 2**30,
                    peak_ratio=p["dgpo"] / p["grpo_beta0.04"],
                    **{f"{k}_s": v for k, v in c["parts"].items()},
                )
            )
    return rows


def measured_pieces(measured: list[dict]) -> dict:
    """The `m` that `compose` takes, rebuilt from a results file's `measured` rows."""
    m = dict(backbone={}, head={})
    for row in measured:
        if row["what"] == "adamw per parameter":
            m["adamw_s_per_param"] = row["value"]
            continue
        key = tuple(row["what"].rsplit(" ", 1))
        if row.get("per_layer") is not None:
            m["backbone"][key] = dict(per_layer=row["per_layer"], constant=row["constant"])
        else:
            m["head"][key] = row["value"]
    return m


def recompose(path: Path, zero_fractions) -> None:
    results = json.loads(path.read_text())
    meta = results["meta"]
    projected = projection_rows(
        measured_pieces(meta["measured"]), meta["spec"], meta["steps_per_generation"], zero_fractions, meta["batch"]
    )
    paths = write_results(path.stem, projected, meta, path.parent)
    print(f"recomposed {paths[0]} and {paths[1]} from the measured pieces of {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "micro"], default="qwen2.5-7b")
    parser.add_argument("--batch", type=int, default=8, help="completions per optimizer step")
    parser.add_argument(
        "--prompt-length", type=int, default=None, help="prompt tokens (default: the mean over bench_steps' prompts)"
    )
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--steps-per-generation", type=int, default=PATHS["offpolicy"])
    parser.add_argument("--zero-fractions", type=float, nargs="+", default=[0.0, 0.4, 0.6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stem", default=None, help="default layers_<shape>_<device>")
    parser.add_argument(
        "--recompose",
        type=Path,
        default=None,
        help="a results .json of this script: compose its measured pieces again (after a change to `compose`), "
        "rewriting its projection rows in place; measures nothing",
    )
    args = parser.parse_args()
    if args.recompose is not None:
        recompose(args.recompose, args.zero_fractions)
        return
    set_malloc("reuse")  # timings without page faults (peak_extra_memory switches for its own calls)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = SHAPES[args.shape]
    if args.prompt_length is None:
        from dgpo_trl.tasks import reversal_dataset
        from dgpo_trl.tiny import build_tokenizer

        tokenizer = build_tokenizer()
        args.prompt_length = round(
            statistics.fmean(len(tokenizer(p)["input_ids"]) for p in reversal_dataset(512, seed=2)["prompt"])
        )
    batch, prompt, completion, spg = (
        args.batch,
        args.prompt_length,
        args.max_completion_length,
        args.steps_per_generation,
    )
    start = time.perf_counter()
    meta = machine_info(device) | dict(
        argv=sys.argv,
        shape=args.shape,
        spec=spec,
        batch=batch,
        prompt=prompt,
        completion=completion,
        steps_per_generation=spg,
    )
    print(
        f"# {args.shape}: B={batch} P={prompt} L={completion} spg={spg}, {args.threads} threads, load "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = {"step": batch, "generation": spg * batch}
    m = dict(backbone=measure_backbone(spec, rows, prompt, completion, args.repeats, device))
    print(f"# backbone measured ({time.perf_counter() - start:.0f}s)", flush=True)
    m["head"] = measure_head(
        spec, {name: r * completion for name, r in rows.items()}, rows, completion, args.repeats, device
    )
    print(f"# heads measured ({time.perf_counter() - start:.0f}s)", flush=True)
    m["adamw_s_per_param"] = measure_adamw(spec, args.repeats, device)
    projected = projection_rows(m, spec, spg, args.zero_fractions, batch)
    measured = (
        [dict(what=f"{k[0]} {k[1]}", **v) for k, v in m["backbone"].items()]
        + [dict(what=f"{k[0]} {k[1]}", value=v) for k, v in m["head"].items()]
        + [dict(what="adamw per parameter", value=m["adamw_s_per_param"])]
    )
    print(format_table(measured, ["what", "per_layer", "constant", "value"]))
    print(f"\n# PROJECTION at {spec['layers']} layers (composed from the pieces above; not a trainer run)")
    print(
        format_table(
            projected,
            [
                "path",
                "zero_fraction",
                "grpo_beta0_s",
                "grpo_beta004_s",
                "dgpo_s",
                "dgpo_over_grpo004",
                "dgpo_over_grpo0",
                "floor",
                "dgpo_dropout_over_grpo004",
                "peak_gib_grpo004",
                "peak_gib_dgpo",
                "peak_ratio",
            ],
        )
    )
    meta.update(
        measured=measured,
        seconds=time.perf_counter() - start,
        load_average_at_end=os.getloadavg(),
        parameters=parameter_count(spec),
    )
    paths = write_results(args.stem or f"layers_{args.shape}_{device.type}", projected, meta, args.out)
    print(f"\nwrote {paths[0]} and {paths[1]} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
