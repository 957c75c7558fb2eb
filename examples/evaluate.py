# Copyright 2026 The dgpo-trl authors. Apache-2.0.
"""Evaluate a model with the DGPO paper's protocol: n = 32 samples per problem at temperature 1.0 and top-p 0.7,
reporting Avg@n, Cons@n (majority vote over math-verify-equivalent answers) and Pass@k (unbiased estimator).

    python examples/evaluate.py --model_name_or_path outputs/qwen2.5-7b-math_dgpo --dataset_name aime2024
    python examples/evaluate.py --model_name_or_path ... --dataset_name aime2025 --pass_k 1 8 32 --backend vllm

Uses vLLM when it is installed (`--backend auto`, the default), transformers `generate` otherwise. Results go to a
JSON file (default `eval_results/<model>_<dataset>.json`), updated after every batch of problems; running the same
command again skips the problems already there, so an interrupted evaluation resumes. The summary table is printed
at the end. Offline example on a tiny local model and a synthetic task:

    python examples/evaluate.py --model_name_or_path path/to/tiny --dataset_name reversal --num_samples 8 \\
        --max_new_tokens 8 --limit 20
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from dgpo_trl.data import REASONING_INSTRUCTION, is_synthetic, load_task, resolve_dataset_name
from dgpo_trl.evaluation import evaluate, format_table, make_generator, scorer_for


@dataclass
class EvaluationArguments:
    """Arguments of `examples/evaluate.py`."""

    model_name_or_path: str = field(metadata={"help": "Hub id or local path of the model to evaluate."})
    dataset_name: str = field(
        default="aime2024",
        metadata={
            "help": "aime2024, aime2025, math500, gsm8k, dapo17k (or their Hub ids), reversal, addition or filler."
        },
    )
    dataset_split: str | None = field(default=None, metadata={"help": "Split; default: the set's usual one."})
    num_samples: int = field(default=32, metadata={"help": "n: samples per problem (paper: 32)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=0.7, metadata={"help": "Top-p (paper: 0.7)."})
    pass_k: list[int] | None = field(
        default=None, metadata={"help": "The k of each reported Pass@k (each <= num_samples); default: num_samples."}
    )
    max_new_tokens: int = field(default=3072, metadata={"help": "Completion budget per sample."})
    backend: str = field(
        default="auto", metadata={"help": "auto (vLLM if installed), vllm or hf.", "choices": ["auto", "vllm", "hf"]}
    )
    output_file: str | None = field(
        default=None,
        metadata={"help": "Results JSON (resumed if it exists). Default: eval_results/<model>_<dataset>.json"},
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N problems only."})
    problems_per_batch: int = field(default=8, metadata={"help": "Problems generated (and saved) together."})
    batch_size: int = field(default=64, metadata={"help": "HF backend: sequences per generate call."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16, float32."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM backend: tensor-parallel GPUs."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM backend: GPU memory fraction."})
    instruction: str = field(
        default=REASONING_INSTRUCTION, metadata={"help": "Instruction appended to math problems."}
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    save_completions: bool = field(default=True, metadata={"help": "Store every sample's text in the JSON."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


def default_output_file(args: EvaluationArguments) -> Path:
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", args.model_name_or_path.strip("/").split("/")[-1])
    return Path("eval_results") / f"{model}_{resolve_dataset_name(args.dataset_name)}.json"


def main(args: EvaluationArguments) -> dict:
    dataset_name = resolve_dataset_name(args.dataset_name)
    kwargs = {} if is_synthetic(dataset_name) else {"instruction": args.instruction}
    split = args.dataset_split or ("test" if is_synthetic(dataset_name) else None)
    dataset = load_task(dataset_name, split, limit=args.limit, **kwargs)
    output_file = Path(args.output_file) if args.output_file else default_output_file(args)
    generator = make_generator(
        args.model_name_or_path,
        args.backend,
        batch_size=args.batch_size,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
    )
    results = evaluate(
        dataset,
        generator,
        scorer_for(dataset_name),
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        ks=args.pass_k,
        output_path=output_file,
        problems_per_batch=args.problems_per_batch,
        save_completions=args.save_completions,
        seed=args.seed,
        model_name=args.model_name_or_path,
        dataset_name=dataset_name,
        split=split,
    )
    print(format_table(results["summary"], title=f"{args.model_name_or_path} on {dataset_name}"))
    print(f"\nResults: {output_file.resolve()}")
    print(json.dumps(results["summary"]))
    return results


if __name__ == "__main__":
    (evaluation_args,) = TrlParser(EvaluationArguments).parse_args_and_config()
    main(evaluation_args)
