"""Speed baseline: transformers' float32 W4A16 reference model of a fixture, on 2 CPU threads.

    python conformance/fixtures_gen/bench_transformers.py fixtures/tiny-31b-recipe

Loads the same model as the golden reference (reference_model.py: dequantized NVFP4 weights,
float32, eager attention, bf16-rounded embedding scale) and prints one JSON line:
  prefill: one forward over a 256-token prompt, median of 5 after a warm-up -> tokens/s
  decode:  greedy generate() of 128 new tokens with the KV cache after a 16-token prompt; the decode
           phase (after the first token, i.e. 127 single-token steps) timed with a streamer-free
           LogitsProcessor clock, median of 3 after a warm-up -> tokens/s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from reference_model import load_reference_model  # noqa: E402


class StepClock:
    """LogitsProcessor that records the wall time at every generation step."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--decode-prompt-len", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import GenerationConfig, LogitsProcessorList

    model = load_reference_model(args.fixture_dir)
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)

    prompt = torch.randint(107, vocab, (1, args.prefill_len), generator=g)
    prompt[0, 0] = 2
    times = []
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=False)  # warm-up
        for _ in range(5):
            t0 = time.perf_counter()
            model(input_ids=prompt, use_cache=False)
            times.append(time.perf_counter() - t0)
    prefill_s = statistics.median(times)

    dprompt = torch.randint(107, vocab, (1, args.decode_prompt_len), generator=g)
    dprompt[0, 0] = 2
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=args.decode_tokens,
        min_new_tokens=args.decode_tokens,
        use_cache=True,
        bos_token_id=2,
        pad_token_id=0,
        eos_token_id=None,
    )
    decode_rates = []
    total_times = []
    with torch.inference_mode():
        for rep in range(4):  # first is a warm-up
            clock = StepClock()
            t0 = time.perf_counter()
            out = model.generate(
                input_ids=dprompt,
                attention_mask=torch.ones_like(dprompt),
                generation_config=gc,
                logits_processor=LogitsProcessorList([clock]),
            )
            t1 = time.perf_counter()
            n_new = out.shape[1] - dprompt.shape[1]
            assert n_new == args.decode_tokens, n_new
            # clock.times[0]: after the prefill forward; clock.times[-1]: after the last decode forward
            assert len(clock.times) == n_new
            if rep > 0:
                decode_rates.append((n_new - 1) / (clock.times[-1] - clock.times[0]))
                total_times.append(t1 - t0)
    print(
        json.dumps(
            {
                "fixture": os.path.basename(os.path.normpath(args.fixture_dir)),
                "engine": "transformers eager float32 W4A16 (reference model)",
                "threads": torch.get_num_threads(),
                "prefill_tokens": args.prefill_len,
                "prefill_median_s": round(prefill_s, 6),
                "prefill_tok_per_s": round(args.prefill_len / prefill_s, 1),
                "decode_prompt_tokens": args.decode_prompt_len,
                "decode_new_tokens": args.decode_tokens,
                "decode_tok_per_s": round(statistics.median(decode_rates), 1),
                "decode_runs_tok_per_s": [round(r, 1) for r in decode_rates],
                "generate_total_median_s": round(statistics.median(total_times), 4),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
